import CHDF5
import Foundation

/// Element types the tool reads and writes.
public enum StorageType: String, Sendable, CaseIterable {
    case f16, f32, f64, bf16, i32, i64
    /// Bytes per element on disk.
    public var byteSize: Int {
        switch self {
        case .f16, .bf16: return 2
        case .f32, .i32: return 4
        case .f64, .i64: return 8
        }
    }
}

/// A thin, throwing wrapper over the HDF5 C library (the Debian 1.10 serial build, which is
/// thread-safe through its global lock). Every failure becomes an `SMoEError` naming the
/// file and the object; HDF5's own error-stack printing is switched off.
public final class H5File: @unchecked Sendable {
    public let path: String
    let id: hid_t
    /// Created or opened for writing: an output of the run, so its errors are `.output`.
    let writable: Bool
    private var open = true

    private init(path: String, id: hid_t, writable: Bool) {
        self.path = path
        self.id = id
        self.writable = writable
    }

    /// An error about `object` in this file (`.output` when the file is written).
    func error(_ object: String, _ what: String) -> SMoEError {
        SMoEError.dataset(path, object, what, kind: writable ? .output : .input)
    }

    /// File access list with close degree STRONG: closing the file closes every object still
    /// open in it, so the file is really closed (and unlocked) when `close()` returns.
    static let strongClose: hid_t = {
        let fapl = H5Pcreate(smoe_P_FILE_ACCESS())
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG)
        return fapl
    }()

    /// HDF5's error-stack printing off; no atexit clean-up (after a failed write on a full disk
    /// it crashed closing what was already closed; the tool closes its files itself).
    static let silenced: Bool = {
        H5dont_atexit()
        smoe_silence_errors()
        return true
    }()

    /// Opens an existing file read-only (or read-write).
    public static func open(_ path: String, writable: Bool = false) throws -> H5File {
        _ = silenced
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw SMoEError.file(path, "no such file")
        }
        if isDir.boolValue { throw SMoEError.file(path, "is a directory, not an HDF5 file") }
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw SMoEError.file(path, "not readable")
        }
        try requireRegularFile(path)
        if !writable { try HDF5InputCheck.checkBeforeOpening(path) }
        if H5Fis_hdf5(path) <= 0 { throw SMoEError.file(path, "not an HDF5 file") }
        let id = H5Fopen(path, writable ? smoe_F_ACC_RDWR() : smoe_F_ACC_RDONLY(), strongClose)
        if id < 0 { throw SMoEError.file(path, "cannot be opened as HDF5 (damaged or truncated?)") }
        return H5File(path: path, id: id, writable: writable)
    }

    /// Creates (truncating) a file.
    public static func create(_ path: String) throws -> H5File {
        _ = silenced
        let id = H5Fcreate(path, smoe_F_ACC_TRUNC(), hid_t(H5P_DEFAULT), strongClose)
        if id < 0 { throw SMoEError.file(path, "cannot be created", kind: .output) }
        return H5File(path: path, id: id, writable: true)
    }

    public func close() {
        if open {
            H5Fclose(id)
            open = false
        }
    }

    /// Flushes and closes the file, throwing when HDF5 reports that either failed (a full
    /// disk shows here, not necessarily in the writes before).
    public func closeChecked() throws {
        guard open else { return }
        let flushed = H5Fflush(id, H5F_SCOPE_GLOBAL)
        let closed = H5Fclose(id)
        open = false
        if flushed < 0 || closed < 0 { throw SMoEError.file(path, "cannot be written completely (disk full?)", kind: .output) }
    }

    deinit { close() }

    public var root: H5Group { H5Group(file: self, id: H5Gopen2(id, "/", hid_t(H5P_DEFAULT)), path: "/") }

    /// Copies object `source` (a group or dataset, recursively) of `from` to `destination` here,
    /// byte for byte (HDF5 `H5Ocopy`).
    public func copyObject(from: H5File, _ source: String, to destination: String) throws {
        let lcpl = H5Pcreate(smoe_P_LINK_CREATE())
        defer { H5Pclose(lcpl) }
        H5Pset_create_intermediate_group(lcpl, 1)
        if H5Ocopy(from.id, source, id, destination, hid_t(H5P_DEFAULT), lcpl) < 0 {
            throw SMoEError.dataset(from.path, source, "could not be copied to \(path)", kind: .output)
        }
    }

    public func flush() { H5Fflush(id, H5F_SCOPE_GLOBAL) }
}

extension AtomicOutput {
    /// Closes `file` (this output's temporary HDF5 file), checking HDF5's status, then commits;
    /// on failure the temporary file is removed and the destination is left as it was.
    func commit(closing file: H5File) throws {
        do { try file.closeChecked() } catch {
            discard()
            throw SMoEError.file(destination, "cannot be written completely (disk full?)", kind: .output)
        }
        try commit()
    }
}

/// Shared behaviour of groups and datasets: attributes.
public class H5Object: @unchecked Sendable {
    public let file: H5File
    let id: hid_t
    /// Absolute path of the object inside the file.
    public let path: String

    init(file: H5File, id: hid_t, path: String) {
        self.file = file
        self.id = id
        self.path = path
    }

    deinit { if id >= 0 { H5Oclose(id) } }

    func fail(_ what: String) -> SMoEError { file.error(path, what) }
    func failAttr(_ name: String, _ what: String) -> SMoEError {
        file.error("\(path == "/" ? "" : path)@\(name)", what)
    }

    public func hasAttribute(_ name: String) -> Bool { H5Aexists(id, name) > 0 }

    private func withAttribute<T>(_ name: String, _ body: (hid_t) throws -> T) throws -> T {
        guard hasAttribute(name) else { throw failAttr(name, "missing attribute") }
        let a = H5Aopen(id, name, hid_t(H5P_DEFAULT))
        if a < 0 { throw failAttr(name, "cannot open attribute") }
        defer { H5Aclose(a) }
        return try body(a)
    }

    /// Elements of attribute `a`, checked against the file's size (8 bytes each) before
    /// anything is allocated for them.
    private func attributeElementCount(_ a: hid_t, _ name: String) throws -> Int {
        let space = H5Aget_space(a)
        defer { H5Sclose(space) }
        let n = Int(max(H5Sget_simple_extent_npoints(space), 0))
        guard let bytes = checkedProduct(n, 8), bytes <= max(fileSize(file.path), 64) else {
            throw failAttr(name, "claims \(n) elements, more than the file holds (damaged file?)")
        }
        return n
    }

    /// Reads a string attribute (variable- or fixed-length).
    public func stringAttribute(_ name: String) throws -> String {
        try withAttribute(name) { a in
            let t = H5Aget_type(a)
            defer { H5Tclose(t) }
            guard H5Tget_class(t) == H5T_STRING else { throw failAttr(name, "is not a string") }
            if H5Tis_variable_str(t) > 0 {
                guard try attributeElementCount(a, name) == 1 else { throw failAttr(name, "is not one string") }
                let mem = H5Tcopy(smoe_T_C_S1())
                defer { H5Tclose(mem) }
                H5Tset_size(mem, smoe_T_VARIABLE())
                H5Tset_cset(mem, H5Tget_cset(t))
                var ptr: UnsafeMutablePointer<CChar>? = nil
                if H5Aread(a, mem, &ptr) < 0 { throw failAttr(name, "cannot be read") }
                guard let p = ptr else { return "" }
                defer { H5free_memory(p) }
                return String(cString: p)
            } else {
                let size = H5Tget_size(t)
                guard try attributeElementCount(a, name) == 1, size <= max(fileSize(file.path), 64) else {
                    throw failAttr(name, "is not one string of at most the file's size (damaged file?)")
                }
                var buf = [UInt8](repeating: 0, count: size + 1)
                if H5Aread(a, t, &buf) < 0 { throw failAttr(name, "cannot be read") }
                let end = buf.firstIndex(of: 0) ?? size
                return String(decoding: buf[0..<end], as: UTF8.self)
            }
        }
    }

    /// Reads an integer attribute (any integer width; converted by HDF5).
    public func intAttribute(_ name: String) throws -> Int {
        let v = try intArrayAttribute(name)
        guard v.count == 1 else { throw failAttr(name, "expected one integer, found \(v.count)") }
        return v[0]
    }

    public func intArrayAttribute(_ name: String) throws -> [Int] {
        try withAttribute(name) { a in
            let t = H5Aget_type(a)
            defer { H5Tclose(t) }
            guard H5Tget_class(t) == H5T_INTEGER else { throw failAttr(name, "is not an integer") }
            var v = [Int64](repeating: 0, count: try attributeElementCount(a, name))
            if !v.isEmpty, H5Aread(a, smoe_T_NATIVE_INT64(), &v) < 0 { throw failAttr(name, "cannot be read") }
            return v.map { Int($0) }
        }
    }

    public func doubleAttribute(_ name: String) throws -> Double {
        try withAttribute(name) { a in
            let t = H5Aget_type(a)
            defer { H5Tclose(t) }
            let c = H5Tget_class(t)
            guard c == H5T_FLOAT || c == H5T_INTEGER else { throw failAttr(name, "is not a number") }
            guard try attributeElementCount(a, name) == 1 else { throw failAttr(name, "expected one number") }
            var v = 0.0
            if H5Aread(a, smoe_T_NATIVE_DOUBLE(), &v) < 0 { throw failAttr(name, "cannot be read") }
            return v
        }
    }

    private func replaceAttribute(_ name: String) {
        if hasAttribute(name) { H5Adelete(id, name) }
    }

    /// Writes a scalar variable-length UTF-8 string attribute (h5py reads it as `str`).
    public func setAttribute(_ name: String, _ value: String) throws {
        replaceAttribute(name)
        let t = H5Tcopy(smoe_T_C_S1())
        defer { H5Tclose(t) }
        H5Tset_size(t, smoe_T_VARIABLE())
        H5Tset_cset(t, H5T_CSET_UTF8)
        let space = H5Screate(H5S_SCALAR)
        defer { H5Sclose(space) }
        let a = H5Acreate2(id, name, t, space, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
        if a < 0 { throw failAttr(name, "cannot create attribute") }
        defer { H5Aclose(a) }
        let status: herr_t = value.withCString { cstr in
            var p: UnsafePointer<CChar>? = cstr
            return withUnsafePointer(to: &p) { H5Awrite(a, t, $0) }
        }
        if status < 0 { throw failAttr(name, "cannot write attribute") }
    }

    /// Writes a scalar int64 attribute.
    public func setAttribute(_ name: String, _ value: Int) throws {
        try setIntArray(name, [value], scalar: true)
    }

    /// Writes an int64 array attribute.
    public func setAttribute(_ name: String, _ values: [Int]) throws {
        try setIntArray(name, values, scalar: false)
    }

    private func setIntArray(_ name: String, _ values: [Int], scalar: Bool) throws {
        replaceAttribute(name)
        let space = scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, [hsize_t(values.count)], nil)
        defer { H5Sclose(space) }
        let a = H5Acreate2(id, name, smoe_T_STD_I64LE(), space, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
        if a < 0 { throw failAttr(name, "cannot create attribute") }
        defer { H5Aclose(a) }
        let v = values.map { Int64($0) }
        if H5Awrite(a, smoe_T_NATIVE_INT64(), v) < 0 { throw failAttr(name, "cannot write attribute") }
    }

    /// Writes a scalar float64 attribute.
    public func setAttribute(_ name: String, _ value: Double) throws {
        replaceAttribute(name)
        let space = H5Screate(H5S_SCALAR)
        defer { H5Sclose(space) }
        let a = H5Acreate2(id, name, smoe_T_IEEE_F64LE(), space, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
        if a < 0 { throw failAttr(name, "cannot create attribute") }
        defer { H5Aclose(a) }
        var v = value
        if H5Awrite(a, smoe_T_NATIVE_DOUBLE(), &v) < 0 { throw failAttr(name, "cannot write attribute") }
    }
}

/// An HDF5 group.
public final class H5Group: H5Object, @unchecked Sendable {
    private func childPath(_ name: String) -> String { path == "/" ? "/" + name : path + "/" + name }

    /// Whether a link `name` (which may contain `/`) exists below this group.
    public func exists(_ name: String) -> Bool {
        var prefix = ""
        for part in name.split(separator: "/") {
            prefix += (prefix.isEmpty ? "" : "/") + part
            if H5Lexists(id, prefix, hid_t(H5P_DEFAULT)) <= 0 { return false }
        }
        return !prefix.isEmpty
    }

    private enum Kind { case group, dataset, other }

    private func kind(_ name: String) -> Kind? {
        guard exists(name) else { return nil }
        let o = H5Oopen(id, name, hid_t(H5P_DEFAULT))
        if o < 0 { return nil }
        defer { H5Oclose(o) }
        switch H5Iget_type(o) {
        case H5I_GROUP: return .group
        case H5I_DATASET: return .dataset
        default: return .other
        }
    }

    public func isGroup(_ name: String) -> Bool { kind(name) == .group }
    public func isDataset(_ name: String) -> Bool { kind(name) == .dataset }

    public func openGroup(_ name: String) throws -> H5Group {
        H5Group(file: file, id: try openChild(name, .group, "group") { H5Gopen2($0, $1, hid_t(H5P_DEFAULT)) }, path: childPath(name))
    }

    /// Opens child `name`, which must be a `want` (`noun` in errors), with `open`.
    private func openChild(_ name: String, _ want: Kind, _ noun: String, _ open: (hid_t, String) -> hid_t) throws -> hid_t {
        guard let k = kind(name) else { throw file.error(childPath(name), "missing \(noun)") }
        guard k == want else { throw file.error(childPath(name), "is not a \(noun)") }
        let h = open(id, name)
        if h < 0 { throw file.error(childPath(name), "cannot open \(noun)") }
        return h
    }

    /// Creates a group (and any missing intermediate groups).
    public func createGroup(_ name: String) throws -> H5Group {
        let lcpl = H5Pcreate(smoe_P_LINK_CREATE())
        defer { H5Pclose(lcpl) }
        H5Pset_create_intermediate_group(lcpl, 1)
        let g = H5Gcreate2(id, name, lcpl, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
        if g < 0 { throw file.error(childPath(name), "cannot create group") }
        return H5Group(file: file, id: g, path: childPath(name))
    }

    /// Removes the link `name` (the object's space is not reclaimed until the file is rewritten).
    public func delete(_ name: String) throws {
        if H5Ldelete(id, name, hid_t(H5P_DEFAULT)) < 0 { throw file.error(childPath(name), "cannot delete") }
    }

    /// Removes attribute `name` when present.
    public func deleteAttribute(_ name: String) {
        if hasAttribute(name) { H5Adelete(id, name) }
    }

    /// Names of the links directly below this group, in name order.
    public func childNames() throws -> [String] {
        var info = H5G_info_t()
        if H5Gget_info(id, &info) < 0 { throw fail("cannot list group") }
        var names: [String] = []
        for i in 0..<info.nlinks {
            let n = H5Lget_name_by_idx(id, ".", H5_INDEX_NAME, H5_ITER_INC, i, nil, 0, hid_t(H5P_DEFAULT))
            if n < 0 { throw fail("cannot list group") }
            var buf = [CChar](repeating: 0, count: Int(n) + 1)
            H5Lget_name_by_idx(id, ".", H5_INDEX_NAME, H5_ITER_INC, i, &buf, Int(n) + 1, hid_t(H5P_DEFAULT))
            names.append(String(decoding: buf.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return names
    }

    public func openDataset(_ name: String) throws -> H5Dataset {
        H5Dataset(file: file, id: try openChild(name, .dataset, "dataset") { H5Dopen2($0, $1, hid_t(H5P_DEFAULT)) }, path: childPath(name))
    }

    /// Creates a dataset of `shape` stored as `type`. `chunk` (same rank) enables chunking;
    /// `gzip` a deflate level (with the shuffle filter) and requires `chunk`.
    public func createDataset(
        _ name: String, shape: [Int], type: StorageType, chunk: [Int]? = nil, gzip: Int? = nil
    ) throws -> H5Dataset {
        let ftype = H5Dataset.fileType(type)
        defer { H5Tclose(ftype) }
        let ds = try createDataset(name, shape: shape, fileType: ftype, chunk: chunk, gzip: gzip)
        if type == .bf16 {
            try ds.setAttribute("dtype", "bfloat16")
            ds.storage = .bf16
        }
        return ds
    }

    /// A dataset of `shape` with HDF5 file type `fileType`: chunked as `chunk` (same rank) when
    /// given, then deflated at level `gzip` with the shuffle filter; intermediate groups created.
    fileprivate func createDataset(_ name: String, shape: [Int], fileType: hid_t, chunk: [Int]?, gzip: Int?) throws -> H5Dataset {
        let dims = shape.map { hsize_t($0) }
        let space = H5Screate_simple(Int32(dims.count), dims, nil)
        defer { H5Sclose(space) }
        let dcpl = H5Pcreate(smoe_P_DATASET_CREATE())
        defer { H5Pclose(dcpl) }
        if let c = chunk, !shape.contains(0) {
            precondition(c.count == shape.count)
            H5Pset_chunk(dcpl, Int32(c.count), c.map { hsize_t(max($0, 1)) })
            if let level = gzip {
                H5Pset_shuffle(dcpl)
                H5Pset_deflate(dcpl, UInt32(level))
            }
        }
        let lcpl = H5Pcreate(smoe_P_LINK_CREATE())
        defer { H5Pclose(lcpl) }
        H5Pset_create_intermediate_group(lcpl, 1)
        let d = H5Dcreate2(id, name, fileType, space, lcpl, dcpl, hid_t(H5P_DEFAULT))
        if d < 0 { throw file.error(childPath(name), "cannot create dataset") }
        return H5Dataset(file: file, id: d, path: childPath(name))
    }

    // Convenience writers for whole datasets.

    @discardableResult
    public func write(_ name: String, floats: [Float], shape: [Int], as type: StorageType = .f32,
                      chunk: [Int]? = nil, gzip: Int? = nil) throws -> H5Dataset {
        let d = try createDataset(name, shape: shape, type: type, chunk: chunk, gzip: gzip)
        try d.write(floats: floats)
        return d
    }

    @discardableResult
    public func write(_ name: String, doubles: [Double], shape: [Int]) throws -> H5Dataset {
        let d = try createDataset(name, shape: shape, type: .f64)
        try d.write(doubles: doubles)
        return d
    }

    @discardableResult
    public func write(_ name: String, ints: [Int], shape: [Int], as type: StorageType = .i64) throws -> H5Dataset {
        let d = try createDataset(name, shape: shape, type: type)
        try d.write(ints: ints)
        return d
    }
}

/// An HDF5 dataset: shape, element type, whole or first-dimension-slab reads.
public final class H5Dataset: H5Object, @unchecked Sendable {
    public let shape: [Int]
    /// The stored element type (floats and integers the tool knows; nil otherwise).
    public fileprivate(set) var storage: StorageType? = nil

    override init(file: H5File, id: hid_t, path: String) {
        let space = H5Dget_space(id)
        defer { H5Sclose(space) }
        let rank = Int(H5Sget_simple_extent_ndims(space))
        var dims = [hsize_t](repeating: 0, count: max(rank, 0))
        if rank > 0 { H5Sget_simple_extent_dims(space, &dims, nil) }
        self.shape = dims.map { Int(clamping: $0) }
        let t = H5Dget_type(id)
        defer { H5Tclose(t) }
        let cls = H5Tget_class(t)
        let size = H5Tget_size(t)
        var st: StorageType? = nil
        if cls == H5T_FLOAT {
            st = size == 2 ? .f16 : size == 4 ? .f32 : size == 8 ? .f64 : nil
        } else if cls == H5T_INTEGER {
            st = size == 4 ? .i32 : size == 8 ? .i64 : (size == 2 ? .bf16 : nil)
        } else if cls == H5T_OPAQUE, size == 2 {
            st = .bf16
        }
        super.init(file: file, id: id, path: path)
        if st == .bf16 {
            // A 16-bit integer or opaque dataset is bfloat16 only when tagged so.
            let tag = (try? stringAttribute("dtype")) ?? ""
            st = tag == "bfloat16" ? .bf16 : nil
        } else if cls == H5T_FLOAT, size == 2 {
            // bfloat16 stored as a custom 16-bit float (8 exponent bits) is converted by HDF5.
            if H5Tget_ebias(t) == 127 { st = .bf16 }
        }
        self.storage = st
    }

    /// Number of elements (`Int.max` when the shape's product overflows: a damaged file).
    public var elementCount: Int { checkedProduct(shape) ?? Int.max }

    /// Number of elements; throws when the shape's product overflows (a damaged file).
    public func checkedElementCount() throws -> Int {
        guard let n = checkedProduct(shape) else { throw fail("shape \(shape) overflows (damaged file?)") }
        return n
    }

    /// How many times its stored size a compressed dataset may expand when read (deflate
    /// cannot do better than about 1,032:1).
    public static let maximumExpansion = 1100

    /// Throws unless `n` elements of `elementSize` bytes fit what this dataset can hold: no more
    /// than the file's size when unfiltered, no more than `maximumExpansion` times it when
    /// compressed. Called before every allocation for a read, so a damaged shape is an error,
    /// not an attempt to allocate exabytes.
    func checkReadSize(_ n: Int, elementSize: Int) throws {
        let fileBytes = fileSize(file.path)
        let filtered = !filters.isEmpty
        let limit = filtered ? (checkedProduct(fileBytes, Self.maximumExpansion) ?? Int.max) : fileBytes
        guard let bytes = checkedProduct(n, elementSize), bytes <= limit else {
            throw fail("shape \(shape) needs more bytes than the \(fileBytes)-byte file can hold\(filtered ? " compressed" : "") (damaged file?)")
        }
    }

    static func fileType(_ type: StorageType) -> hid_t {
        switch type {
        case .f16: return smoe_make_f16le()
        case .f32: return H5Tcopy(smoe_T_IEEE_F32LE())
        case .f64: return H5Tcopy(smoe_T_IEEE_F64LE())
        case .bf16: return H5Tcopy(smoe_T_STD_U16LE())
        case .i32: return H5Tcopy(smoe_T_STD_I32LE())
        case .i64: return H5Tcopy(smoe_T_STD_I64LE())
        }
    }

    private var isBF16Raw: Bool {
        guard storage == .bf16 else { return false }
        let t = H5Dget_type(id)
        defer { H5Tclose(t) }
        return H5Tget_class(t) != H5T_FLOAT
    }

    /// Selection of rows `start ..< start+count` along the first dimension (nil = all).
    private func withSelection<T>(_ range: Range<Int>?, _ body: (hid_t, hid_t, Int) throws -> T) throws -> T {
        guard let r = range else {
            guard checkedProduct(shape) != nil else { throw fail("shape \(shape) overflows (damaged file?)") }
            return try body(H5S_ALL, H5S_ALL, elementCount)
        }
        guard !shape.isEmpty, r.lowerBound >= 0, r.upperBound <= shape[0] else {
            throw fail("rows \(r) outside shape \(shape)")
        }
        let fs = H5Dget_space(id)
        defer { H5Sclose(fs) }
        var start = [hsize_t](repeating: 0, count: shape.count)
        start[0] = hsize_t(r.lowerBound)
        var count = shape.map { hsize_t($0) }
        count[0] = hsize_t(r.count)
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, nil, count, nil)
        let ms = H5Screate_simple(Int32(count.count), count, nil)
        defer { H5Sclose(ms) }
        guard let n = checkedProduct(count.map { Int(clamping: $0) }) else { throw fail("shape \(shape) overflows (damaged file?)") }
        return try body(ms, fs, n)
    }

    /// Refuses a dataset `readFloats` cannot read (integers, untagged 16-bit, other types).
    public func checkFloat() throws {
        guard let st = storage, st != .i32, st != .i64 else { throw fail("is not a floating-point dataset") }
    }

    /// Reads floats (from any float type, or tagged bfloat16), optionally only rows `rows`
    /// of the first dimension.
    public func readFloats(rows: Range<Int>? = nil) throws -> [Float] {
        try checkFloat()
        return try withSelection(rows) { ms, fs, n in
            if n == 0 { return [] }
            try checkReadSize(n, elementSize: 4)
            if isBF16Raw {
                var raw = [UInt16](repeating: 0, count: n)
                if H5Dread(id, smoe_T_NATIVE_UINT16(), ms, fs, hid_t(H5P_DEFAULT), &raw) < 0 {
                    throw fail("cannot be read (damaged file?)")
                }
                return raw.map { Float(bitPattern: UInt32($0) << 16) }
            }
            var out = [Float](repeating: 0, count: n)
            if H5Dread(id, smoe_T_NATIVE_FLOAT(), ms, fs, hid_t(H5P_DEFAULT), &out) < 0 {
                throw fail("cannot be read (damaged file?)")
            }
            return out
        }
    }

    public func readDoubles(rows: Range<Int>? = nil) throws -> [Double] {
        guard storage != nil, storage != .bf16 else { throw fail("is not a numeric dataset") }
        return try withSelection(rows) { ms, fs, n in
            try checkReadSize(n, elementSize: 8)
            var out = [Double](repeating: 0, count: n)
            if n > 0, H5Dread(id, smoe_T_NATIVE_DOUBLE(), ms, fs, hid_t(H5P_DEFAULT), &out) < 0 {
                throw fail("cannot be read (damaged file?)")
            }
            return out
        }
    }

    public func readInts(rows: Range<Int>? = nil) throws -> [Int] {
        guard storage == .i32 || storage == .i64 else { throw fail("is not an integer dataset") }
        return try withSelection(rows) { ms, fs, n in
            try checkReadSize(n, elementSize: 8)
            var out = [Int64](repeating: 0, count: n)
            if n > 0, H5Dread(id, smoe_T_NATIVE_INT64(), ms, fs, hid_t(H5P_DEFAULT), &out) < 0 {
                throw fail("cannot be read (damaged file?)")
            }
            return out.map { Int($0) }
        }
    }

    /// Writes floats over the whole dataset or rows `rows` of the first dimension, converting
    /// in Swift to the stored type (float16 and bfloat16 round to nearest even).
    public func write(floats: [Float], rows: Range<Int>? = nil) throws {
        guard let st = storage else { throw fail("unknown stored type") }
        try withSelection(rows) { ms, fs, n in
            guard floats.count == n else { throw fail("writing \(floats.count) values into \(n)") }
            if n == 0 { return }
            let status: herr_t
            switch st {
            case .f16:
                let halves = floats.map { Float16($0) }
                let mt = smoe_make_f16le()
                defer { H5Tclose(mt) }
                status = H5Dwrite(id, mt, ms, fs, hid_t(H5P_DEFAULT), halves)
            case .bf16:
                let raw = floats.map { bfloat16Bits($0) }
                status = H5Dwrite(id, smoe_T_NATIVE_UINT16(), ms, fs, hid_t(H5P_DEFAULT), raw)
            case .f32, .f64:
                status = H5Dwrite(id, smoe_T_NATIVE_FLOAT(), ms, fs, hid_t(H5P_DEFAULT), floats)
            case .i32, .i64:
                throw fail("is an integer dataset")
            }
            if status < 0 { throw fail("cannot be written") }
        }
    }

    public func write(doubles: [Double]) throws {
        guard doubles.count == elementCount else { throw fail("writing \(doubles.count) values into \(elementCount)") }
        if doubles.isEmpty { return }
        if H5Dwrite(id, smoe_T_NATIVE_DOUBLE(), H5S_ALL, H5S_ALL, hid_t(H5P_DEFAULT), doubles) < 0 {
            throw fail("cannot be written")
        }
    }

    public func write(ints: [Int]) throws {
        guard ints.count == elementCount else { throw fail("writing \(ints.count) values into \(elementCount)") }
        if ints.isEmpty { return }
        let v = ints.map { Int64($0) }
        if H5Dwrite(id, smoe_T_NATIVE_INT64(), H5S_ALL, H5S_ALL, hid_t(H5P_DEFAULT), v) < 0 {
            throw fail("cannot be written")
        }
    }

    /// Bytes the dataset occupies in the file (after any compression).
    /// (At most the file's size: a damaged file may claim more.)
    public var storageBytes: Int { min(Int(clamping: H5Dget_storage_size(id)), fileSize(file.path)) }

    /// Filters in the dataset's pipeline (e.g. ["shuffle", "deflate"]).
    public var filters: [String] {
        let dcpl = H5Dget_create_plist(id)
        defer { H5Pclose(dcpl) }
        let n = H5Pget_nfilters(dcpl)
        var out: [String] = []
        for i in 0..<max(n, 0) {
            var flags: UInt32 = 0
            var nelmts = 0
            var name = [CChar](repeating: 0, count: 64)
            var config: UInt32 = 0
            let f = H5Pget_filter2(dcpl, UInt32(i), &flags, &nelmts, nil, 64, &name, &config)
            out.append(f == H5Z_FILTER_DEFLATE ? "deflate" : f == H5Z_FILTER_SHUFFLE ? "shuffle" : "filter-\(f)")
        }
        return out
    }

    /// Chunk shape, or nil when the dataset is contiguous.
    public var chunkShape: [Int]? {
        let dcpl = H5Dget_create_plist(id)
        defer { H5Pclose(dcpl) }
        guard H5Pget_layout(dcpl) == H5D_CHUNKED else { return nil }
        var dims = [hsize_t](repeating: 0, count: shape.count)
        H5Pget_chunk(dcpl, Int32(shape.count), &dims)
        return dims.map { Int($0) }
    }
}

/// bfloat16 bits of a Float, rounding to nearest even (NaN stays NaN).
public func bfloat16Bits(_ x: Float) -> UInt16 {
    let b = x.bitPattern
    if x.isNaN { return UInt16(b >> 16) | 0x0040 }
    let rounding: UInt32 = 0x7FFF + ((b >> 16) & 1)
    return UInt16((b &+ rounding) >> 16)
}

// MARK: raw tensors (extension for verbatim `/dense` copies)

/// Element types of tensors copied byte for byte (the safetensors dtypes), with their HDF5
/// encoding: IEEE floats, little-endian integers, bfloat16 as uint16 tagged
/// `dtype = "bfloat16"`, and bool as uint8 tagged `dtype = "bool"`.
public enum RawElementType: String, Sendable, CaseIterable {
    case f16, bf16, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64, bool
    /// float8_e4m3fn bytes, stored as u8 tagged `dtype = "float8_e4m3fn"` (HDF5 has no such type).
    case f8_e4m3

    public var byteSize: Int {
        switch self {
        case .i8, .u8, .bool, .f8_e4m3: return 1
        case .f16, .bf16, .i16, .u16: return 2
        case .f32, .i32, .u32: return 4
        case .f64, .i64, .u64: return 8
        }
    }

    /// The HDF5 file (and memory) type; the caller closes it.
    func h5Type() -> hid_t {
        switch self {
        case .f16: return smoe_make_f16le()
        case .f32: return H5Tcopy(smoe_T_IEEE_F32LE())
        case .f64: return H5Tcopy(smoe_T_IEEE_F64LE())
        default:
            let t = H5Tcopy(smoe_T_STD_I64LE())
            H5Tset_size(t, byteSize)
            H5Tset_precision(t, 8 * byteSize)
            let signed: Bool = [.i8, .i16, .i32, .i64].contains(self)
            H5Tset_sign(t, signed ? H5T_SGN_2 : H5T_SGN_NONE)
            return t
        }
    }

    var tag: String? { self == .bf16 ? "bfloat16" : self == .bool ? "bool" : self == .f8_e4m3 ? "float8_e4m3fn" : nil }
}

extension H5Group {
    /// Creates a dataset of element type `type` and writes `bytes` (little endian, row major)
    /// into it unchanged. An empty `shape` makes a scalar dataset.
    @discardableResult
    public func writeRaw(_ name: String, type: RawElementType, shape: [Int], bytes: UnsafeRawBufferPointer) throws -> H5Dataset {
        let pathName = path == "/" ? "/" + name : path + "/" + name
        let count = shape.reduce(1, *)
        guard bytes.count == count * type.byteSize else {
            throw file.error(pathName, "writing \(bytes.count) bytes into \(count) elements of \(type.rawValue)")
        }
        let space = shape.isEmpty ? H5Screate(H5S_SCALAR) : H5Screate_simple(Int32(shape.count), shape.map { hsize_t($0) }, nil)
        defer { H5Sclose(space) }
        let lcpl = H5Pcreate(smoe_P_LINK_CREATE())
        defer { H5Pclose(lcpl) }
        H5Pset_create_intermediate_group(lcpl, 1)
        let t = type.h5Type()
        defer { H5Tclose(t) }
        let d = H5Dcreate2(id, name, t, space, lcpl, hid_t(H5P_DEFAULT), hid_t(H5P_DEFAULT))
        if d < 0 { throw file.error(pathName, "cannot create dataset") }
        let ds = H5Dataset(file: file, id: d, path: pathName)
        if let tag = type.tag { try ds.setAttribute("dtype", tag) }
        if count > 0, H5Dwrite(d, t, H5S_ALL, H5S_ALL, hid_t(H5P_DEFAULT), bytes.baseAddress) < 0 {
            throw file.error(pathName, "cannot be written")
        }
        return ds
    }

    /// Creates a dataset of element type `type` to be written a slab of rows at a time
    /// (`H5Dataset.writeRaw(_:rows:)`), chunked and compressed as `createDataset`.
    public func createRawDataset(_ name: String, type: RawElementType, shape: [Int], chunk: [Int]? = nil,
                                 gzip: Int? = nil) throws -> H5Dataset {
        let t = type.h5Type()
        defer { H5Tclose(t) }
        let ds = try createDataset(name, shape: shape, fileType: t, chunk: chunk, gzip: gzip)
        if let tag = type.tag { try ds.setAttribute("dtype", tag) }
        return ds
    }

    /// Paths (relative to this group, `/`-joined) of every dataset below it, in name order.
    public func datasetPaths() throws -> [String] {
        var out: [String] = []
        func walk(_ g: H5Group, _ prefix: String) throws {
            for n in try g.childNames() {
                if g.isGroup(n) { try walk(try g.openGroup(n), prefix + n + "/") } else if g.isDataset(n) { out.append(prefix + n) }
            }
        }
        try walk(self, "")
        return out
    }
}

extension H5Dataset {
    /// The element type as a raw tensor type, or nil when it is none of them.
    public var rawElementType: RawElementType? {
        let t = H5Dget_type(id)
        defer { H5Tclose(t) }
        let size = H5Tget_size(t)
        switch H5Tget_class(t) {
        case H5T_FLOAT:
            guard H5Tget_order(t) == H5T_ORDER_LE else { return nil }
            if size == 2 { return H5Tget_ebias(t) == 15 ? .f16 : nil }
            return size == 4 ? .f32 : size == 8 ? .f64 : nil
        case H5T_INTEGER:
            guard H5Tget_order(t) == H5T_ORDER_LE || size == 1 else { return nil }
            let tag = hasAttribute("dtype") ? ((try? stringAttribute("dtype")) ?? "") : ""
            let signed = H5Tget_sign(t) == H5T_SGN_2
            switch (size, signed) {
            case (1, true): return .i8
            case (1, false): return tag == "bool" ? .bool : tag == "float8_e4m3fn" ? .f8_e4m3 : .u8
            case (2, true): return .i16
            case (2, false): return tag == "bfloat16" ? .bf16 : .u16
            case (4, true): return .i32
            case (4, false): return .u32
            case (8, true): return .i64
            case (8, false): return .u64
            default: return nil
            }
        default: return nil
        }
    }

    /// The stored bytes (of rows `rows` of the first dimension; nil: all), unchanged (little
    /// endian, row major).
    public func readRaw(rows: Range<Int>? = nil) throws -> [UInt8] {
        guard let type = rawElementType else { throw fail("has an element type that cannot be copied verbatim") }
        return try withSelection(rows) { ms, fs, n in
            guard let bytes = checkedProduct(n, type.byteSize) else { throw fail("shape \(shape) overflows (damaged file?)") }
            try checkReadSize(n, elementSize: type.byteSize)
            var out = [UInt8](repeating: 0, count: bytes)
            if n == 0 { return out }
            let t = type.h5Type()
            defer { H5Tclose(t) }
            let status = out.withUnsafeMutableBytes { H5Dread(id, t, ms, fs, hid_t(H5P_DEFAULT), $0.baseAddress) }
            if status < 0 { throw fail("cannot be read (damaged file?)") }
            return out
        }
    }

    /// Writes `bytes` (elements of the dataset's raw type, little endian, row major) into rows
    /// `rows` of the first dimension.
    public func writeRaw(_ bytes: [UInt8], rows: Range<Int>) throws {
        guard let type = rawElementType else { throw fail("has an element type that cannot be written verbatim") }
        try withSelection(rows) { ms, fs, n in
            guard bytes.count == n * type.byteSize else { throw fail("writing \(bytes.count) bytes into \(n) elements of \(type.rawValue)") }
            if n == 0 { return }
            let t = type.h5Type()
            defer { H5Tclose(t) }
            let status = bytes.withUnsafeBytes { H5Dwrite(id, t, ms, fs, hid_t(H5P_DEFAULT), $0.baseAddress) }
            if status < 0 { throw fail("cannot be written") }
        }
    }
}
