import CHDF5
import Foundation

/// Defence against damaged HDF5 input (docs/FORMAT.md, "Damaged input").
///
/// libhdf5 follows the pointers in a file's metadata (object headers, B-trees, local and global
/// heaps) without bounding them, so a damaged file can crash it or make it loop however carefully
/// the caller checks values. `walk` reads, through the libhdf5 API, every piece of metadata the
/// readers of this library touch: every group and its links (listed and looked up by name), every
/// object header, every attribute (type, shape and value, including variable-length strings in the
/// global heap), every dataset's type, shape, creation properties and storage size. Raw data is
/// not read. Run isolated (`isolatedRunner`, installed by a host such as the command line, which
/// re-executes itself in a child process), a crash or a stall of the walk becomes one error naming
/// the file, and the real open that follows only meets metadata that libhdf5 has already read
/// without harm.
public enum HDF5InputCheck {
    /// Runs `walk(path)` isolated from this process and throws its error, or an error naming the
    /// file when the isolated walk crashed or stopped making progress. nil (the default): inputs
    /// are opened without a pre-check.
    nonisolated(unsafe) public static var isolatedRunner: (@Sendable (String) throws -> Void)?

    private static let lock = NSLock()
    nonisolated(unsafe) private static var passed: Set<String> = []

    /// Runs the isolated check once per file (path, device, inode, size and modification time)
    /// in this process.
    static func checkBeforeOpening(_ path: String) throws {
        guard let run = isolatedRunner else { return }
        var st = stat()
        guard stat(path, &st) == 0 else { return }  // the open reports it
        let key = "\(st.st_dev):\(st.st_ino):\(st.st_size):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec):\(path)"
        lock.lock()
        let done = passed.contains(key)
        lock.unlock()
        if done { return }
        try run(path)
        lock.lock()
        passed.insert(key)
        lock.unlock()
    }

    /// Opens `path` read-only and reads all of its metadata (see the type's comment); throws the
    /// first problem libhdf5 reports. `heartbeat` is called after each object, so a supervisor
    /// can tell a slow walk from a stalled one. Run it in a child process: on a damaged file it
    /// can crash or never return (that is what it is for).
    public static func walk(_ path: String, heartbeat: @escaping () -> Void = {}) throws {
        let file = try H5File.open(path)
        defer { file.close() }
        var walker = Walker(path: path, fileBytes: fileSize(path), heartbeat: heartbeat)
        heartbeat()
        let root = H5Oopen(file.id, "/", hid_t(H5P_DEFAULT))
        if root < 0 { throw SMoEError.dataset(path, "/", "cannot open the root group (damaged file?)") }
        defer { H5Oclose(root) }
        try walker.object(root, "/")
        // Checkpoint writers copy /dense verbatim (H5Ocopy decodes every header message, more
        // than the walk's queries do): copy it here too, into a file in memory.
        if H5Lexists(file.id, "dense", hid_t(H5P_DEFAULT)) > 0 {
            let fapl = H5Pcreate(smoe_P_FILE_ACCESS())
            defer { H5Pclose(fapl) }
            H5Pset_fapl_core(fapl, 1 << 26, false)
            let mem = H5Fcreate("smoe-input-check-\(getpid())", smoe_F_ACC_TRUNC(), hid_t(H5P_DEFAULT), fapl)
            if mem < 0 { throw SMoEError.file(path, "cannot check /dense (no memory for a copy)") }
            defer { H5Fclose(mem) }
            if H5Ocopy(file.id, "/dense", mem, "/dense", hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT)) < 0 {
                throw SMoEError.dataset(path, "/dense", "cannot be copied (damaged file?)")
            }
            heartbeat()
        }
    }

    private struct Walker {
        let path: String
        let fileBytes: Int
        let heartbeat: () -> Void
        var visited: Set<UInt64> = []

        func fail(_ object: String, _ what: String) -> SMoEError { SMoEError.dataset(path, object, what) }

        /// `handle` (of `object`) when HDF5 returned one; else the error "cannot read `what` (damaged file?)".
        func opened(_ handle: hid_t, _ object: String, _ what: String) throws -> hid_t {
            if handle < 0 { throw fail(object, "cannot read \(what) (damaged file?)") }
            return handle
        }

        mutating func object(_ id: hid_t, _ name: String) throws {
            var info = H5O_info_t()
            if H5Oget_info2(id, &info, UInt32(H5O_INFO_BASIC | H5O_INFO_NUM_ATTRS)) < 0 {
                throw fail(name, "cannot read the object header (damaged file?)")
            }
            guard visited.insert(UInt64(info.addr)).inserted else { return }
            try attributes(id, name, count: info.num_attrs)
            switch H5Iget_type(id) {
            case H5I_GROUP: try group(id, name)
            case H5I_DATASET: try dataset(id, name)
            default: break
            }
            heartbeat()
        }

        mutating func group(_ id: hid_t, _ name: String) throws {
            var ginfo = H5G_info_t()
            if H5Gget_info(id, &ginfo) < 0 { throw fail(name, "cannot list group (damaged file?)") }
            guard ginfo.nlinks <= hsize_t(max(fileBytes, 0)) else { throw fail(name, "claims \(ginfo.nlinks) links, more than the file can hold") }
            for i in 0..<ginfo.nlinks {
                let n = H5Lget_name_by_idx(id, ".", H5_INDEX_NAME, H5_ITER_INC, i, nil, 0, hid_t(H5P_DEFAULT))
                guard n >= 0, n <= fileBytes else { throw fail(name, "cannot list group (damaged file?)") }
                var buf = [CChar](repeating: 0, count: Int(n) + 1)
                if H5Lget_name_by_idx(id, ".", H5_INDEX_NAME, H5_ITER_INC, i, &buf, Int(n) + 1, hid_t(H5P_DEFAULT)) < 0 {
                    throw fail(name, "cannot list group (damaged file?)")
                }
                let child = String(decoding: buf.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
                let childPath = name == "/" ? "/" + child : name + "/" + child
                // Looked up by name, as the readers do (a different path through the group's index).
                if H5Lexists(id, buf, hid_t(H5P_DEFAULT)) <= 0 { throw fail(childPath, "link cannot be looked up (damaged file?)") }
                var linfo = H5L_info_t()
                if H5Lget_info(id, buf, &linfo, hid_t(H5P_DEFAULT)) < 0 { throw fail(childPath, "cannot read link (damaged file?)") }
                guard linfo.type == H5L_TYPE_HARD else { continue }  // soft and external links are not followed here
                let o = H5Oopen(id, buf, hid_t(H5P_DEFAULT))
                if o < 0 { throw fail(childPath, "cannot open object (damaged file?)") }
                defer { H5Oclose(o) }
                try object(o, childPath)
            }
        }

        func dataset(_ id: hid_t, _ name: String) throws {
            let space = try opened(H5Dget_space(id), name, "dataspace")
            defer { H5Sclose(space) }
            let rank = H5Sget_simple_extent_ndims(space)
            guard rank >= 0, rank <= 32 else { throw fail(name, "has an invalid dataspace (damaged file?)") }
            var dims = [hsize_t](repeating: 0, count: Int(rank))
            if rank > 0, H5Sget_simple_extent_dims(space, &dims, nil) < 0 { throw fail(name, "has an invalid dataspace (damaged file?)") }
            let t = try opened(H5Dget_type(id), name, "element type")
            defer { H5Tclose(t) }
            try describe(t, name)
            let dcpl = try opened(H5Dget_create_plist(id), name, "creation properties")
            defer { H5Pclose(dcpl) }
            let nfilters = H5Pget_nfilters(dcpl)
            guard nfilters >= 0, nfilters <= 32 else { throw fail(name, "has an invalid filter pipeline (damaged file?)") }
            for i in 0..<nfilters {
                var flags: UInt32 = 0, nelmts = 8, config: UInt32 = 0
                var values = [UInt32](repeating: 0, count: 8)
                var fname = [CChar](repeating: 0, count: 64)
                if H5Pget_filter2(dcpl, UInt32(i), &flags, &nelmts, &values, 64, &fname, &config) < 0 {
                    throw fail(name, "has an invalid filter pipeline (damaged file?)")
                }
            }
            if H5Pget_layout(dcpl) == H5D_CHUNKED {
                var chunk = [hsize_t](repeating: 0, count: max(Int(rank), 1))
                if H5Pget_chunk(dcpl, max(rank, 1), &chunk) < 0 { throw fail(name, "has invalid chunking (damaged file?)") }
            }
            _ = H5Dget_storage_size(id)  // walks the chunk index of a chunked dataset
        }

        /// Queries an element type the way the readers do, and converts a copy (a conversion
        /// path is what `H5Aread` / `H5Dread` build).
        func describe(_ t: hid_t, _ name: String) throws {
            let cls = H5Tget_class(t)
            if cls == H5T_NO_CLASS { throw fail(name, "has an invalid element type (damaged file?)") }
            let size = H5Tget_size(t)
            guard size > 0, size <= 1 << 16 else { throw fail(name, "has an invalid element size \(size) (damaged file?)") }
            switch cls {
            case H5T_INTEGER:
                _ = H5Tget_sign(t); _ = H5Tget_order(t); _ = H5Tget_precision(t); _ = H5Tget_offset(t)
            case H5T_FLOAT:
                _ = H5Tget_order(t); _ = H5Tget_ebias(t); _ = H5Tget_precision(t)
                var spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0
                H5Tget_fields(t, &spos, &epos, &esize, &mpos, &msize)
            case H5T_STRING:
                _ = H5Tis_variable_str(t); _ = H5Tget_cset(t); _ = H5Tget_strpad(t)
            default: break
            }
            let c = H5Tcopy(t)
            if c < 0 { throw fail(name, "has an invalid element type (damaged file?)") }
            H5Tclose(c)
        }

        func attributes(_ id: hid_t, _ name: String, count: hsize_t) throws {
            guard count <= hsize_t(max(fileBytes, 0)) else { throw fail(name, "claims \(count) attributes, more than the file can hold") }
            for i in 0..<count {
                let a = H5Aopen_by_idx(id, ".", H5_INDEX_NAME, H5_ITER_INC, i, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
                if a < 0 { throw fail(name, "cannot open attribute \(i) (damaged file?)") }
                defer { H5Aclose(a) }
                let n = H5Aget_name(a, 0, nil)
                guard n >= 0, n <= fileBytes else { throw fail(name, "attribute \(i) has no readable name (damaged file?)") }
                var buf = [CChar](repeating: 0, count: Int(n) + 1)
                H5Aget_name(a, Int(n) + 1, &buf)
                let attr = "\(name == "/" ? "" : name)@" + String(decoding: buf.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if H5Aexists(id, buf) <= 0 { throw fail(attr, "attribute cannot be looked up by name (damaged file?)") }
                try attributeValue(a, attr)
            }
        }

        func attributeValue(_ a: hid_t, _ attr: String) throws {
            let t = try opened(H5Aget_type(a), attr, "attribute type")
            defer { H5Tclose(t) }
            try describe(t, attr)
            let space = try opened(H5Aget_space(a), attr, "attribute shape")
            defer { H5Sclose(space) }
            let np = H5Sget_simple_extent_npoints(space)
            let size = H5Tget_size(t)
            guard np >= 0, let bytes = checkedProduct(Int(np), max(size, 8)), bytes <= fileBytes else {
                throw fail(attr, "claims \(np) elements, more than the file holds (damaged file?)")
            }
            let n = Int(np)
            if n == 0 { return }
            let status: herr_t
            switch H5Tget_class(t) {
            case H5T_STRING where H5Tis_variable_str(t) > 0:
                let mem = H5Tcopy(smoe_T_C_S1())
                defer { H5Tclose(mem) }
                H5Tset_size(mem, smoe_T_VARIABLE())
                H5Tset_cset(mem, H5Tget_cset(t))
                var ptrs = [UnsafeMutablePointer<CChar>?](repeating: nil, count: n)
                status = H5Aread(a, mem, &ptrs)
                for p in ptrs { if let p { H5free_memory(p) } }
            case H5T_STRING:
                var raw = [UInt8](repeating: 0, count: n * size)
                status = H5Aread(a, t, &raw)
            case H5T_INTEGER:
                var v = [Int64](repeating: 0, count: n)
                status = H5Aread(a, smoe_T_NATIVE_INT64(), &v)
            case H5T_FLOAT:
                var v = [Double](repeating: 0, count: n)
                status = H5Aread(a, smoe_T_NATIVE_DOUBLE(), &v)
            default:
                return  // the readers read no other kind of attribute
            }
            if status < 0 { throw fail(attr, "cannot be read (damaged file?)") }
        }
    }
}

/// Size in bytes of the file at `path` (0 when it cannot be stat'ed).
func fileSize(_ path: String) -> Int {
    var st = stat()
    return stat(path, &st) == 0 ? Int(st.st_size) : 0
}

/// a·b, or nil when it overflows `Int` (or either is negative).
public func checkedProduct(_ a: Int, _ b: Int) -> Int? {
    guard a >= 0, b >= 0 else { return nil }
    let (p, o) = a.multipliedReportingOverflow(by: b)
    return o ? nil : p
}

/// The product of `factors`, or nil when it overflows `Int` (or a factor is negative).
public func checkedProduct(_ factors: [Int]) -> Int? {
    var p = 1
    for f in factors {
        guard let q = checkedProduct(p, f) else { return nil }
        p = q
    }
    return p
}

/// a + b, saturating at `Int.max` (sums of sizes shown in summaries).
public func saturatingSum(_ a: Int, _ b: Int) -> Int {
    let (s, o) = a.addingReportingOverflow(b)
    return o ? (a < 0 ? Int.min : Int.max) : s
}
