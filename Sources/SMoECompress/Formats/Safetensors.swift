import Foundation

/// Element types of the safetensors format.
public enum SafetensorsDType: String, Sendable, CaseIterable {
    case F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL
    /// float8_e4m3fn (block-scaled FP8 checkpoints; decoded by `FP8E4M3`, never by `decode`).
    case F8_E4M3

    public var byteSize: Int {
        switch self {
        case .F64, .I64, .U64: return 8
        case .F32, .I32, .U32: return 4
        case .F16, .BF16, .I16, .U16: return 2
        case .I8, .U8, .BOOL, .F8_E4M3: return 1
        }
    }

    public var isFloat: Bool { [.F64, .F32, .F16, .BF16].contains(self) }

    /// The HDF5 encoding used for verbatim copies.
    public var rawType: RawElementType {
        switch self {
        case .F64: return .f64
        case .F32: return .f32
        case .F16: return .f16
        case .BF16: return .bf16
        case .I64: return .i64
        case .I32: return .i32
        case .I16: return .i16
        case .I8: return .i8
        case .U64: return .u64
        case .U32: return .u32
        case .U16: return .u16
        case .U8: return .u8
        case .BOOL: return .bool
        case .F8_E4M3: return .f8_e4m3
        }
    }

    public init(_ raw: RawElementType) {
        switch raw {
        case .f64: self = .F64
        case .f32: self = .F32
        case .f16: self = .F16
        case .bf16: self = .BF16
        case .i64: self = .I64
        case .i32: self = .I32
        case .i16: self = .I16
        case .i8: self = .I8
        case .u64: self = .U64
        case .u32: self = .U32
        case .u16: self = .U16
        case .u8: self = .U8
        case .bool: self = .BOOL
        case .f8_e4m3: self = .F8_E4M3
        }
    }

    /// Encodes floats as this (floating-point) type: float16 and bfloat16 round to nearest even.
    public func encode(_ values: [Float]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: values.count * byteSize)
        out.withUnsafeMutableBytes { p in
            switch self {
            case .F32:
                for (i, v) in values.enumerated() { p.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
            case .F16:
                for (i, v) in values.enumerated() { p.storeBytes(of: Float16(v).bitPattern.littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
            case .BF16:
                for (i, v) in values.enumerated() { p.storeBytes(of: bfloat16Bits(v).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
            case .F64:
                for (i, v) in values.enumerated() { p.storeBytes(of: Double(v).bitPattern.littleEndian, toByteOffset: 8 * i, as: UInt64.self) }
            default:
                preconditionFailure("encode(_:) is for floating-point types")
            }
        }
        return out
    }

    /// Decodes little-endian values of this (floating-point) type as Float.
    public func decode(_ p: UnsafeRawBufferPointer) -> [Float] {
        let n = p.count / byteSize
        var out = [Float](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { o in
            switch self {
            case .F32:
                for i in 0..<n { o[i] = Float(bitPattern: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
            case .F16:
                for i in 0..<n { o[i] = Float(Float16(bitPattern: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))) }
            case .BF16:
                for i in 0..<n { o[i] = Float(bitPattern: UInt32(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self))) << 16) }
            case .F64:
                for i in 0..<n { o[i] = Float(Double(bitPattern: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)))) }
            default:
                break
            }
        }
        return out
    }
}

/// One tensor's entry in a safetensors header.
public struct SafetensorsTensorInfo: Sendable, Equatable {
    public var name: String
    public var dtype: SafetensorsDType
    public var shape: [Int]
    /// Byte range inside the data section (after the header).
    public var begin: Int
    public var end: Int
    public var byteCount: Int { end - begin }
    public var elementCount: Int { checkedProduct(shape) ?? Int.max }
}

/// A read-only, memory-mapped `.safetensors` file whose header has been fully validated:
/// every tensor's bytes lie inside the file, tensors do not overlap, and each byte range
/// matches its shape and dtype. Malformed files give a one-line `SMoEError` naming the file
/// (and the tensor), never a crash.
public final class SafetensorsFile: @unchecked Sendable {
    /// The largest header accepted (as the reference implementation).
    public static let maxHeaderBytes = 100_000_000

    public let path: String
    /// Tensors in the order of their data offsets.
    public let tensors: [SafetensorsTensorInfo]
    /// `__metadata__` entries in header order.
    public let metadata: [(String, String)]
    private let byName: [String: Int]
    private let base: UnsafeMutableRawPointer?
    private let fileSize: Int
    private let dataStart: Int

    public init(_ path: String) throws {
        self.path = path
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { throw SMoEError.file(path, "no such file") }
        if isDir.boolValue { throw SMoEError.file(path, "is a directory, not a safetensors file") }
        try requireRegularFile(path)
        let fd = open(path, O_RDONLY)
        if fd < 0 { throw SMoEError.file(path, "cannot be opened: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SMoEError.file(path, "cannot be read") }
        let size = Int(st.st_size)
        guard size >= 8 else {
            throw SMoEError.file(path, "truncated safetensors file: \(size) bytes, shorter than the 8-byte header length")
        }
        guard let m = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), m != MAP_FAILED else {
            throw SMoEError.file(path, "cannot be memory-mapped: \(String(cString: strerror(errno)))")
        }
        var ok = false
        defer { if !ok { munmap(m, size) } }
        let raw = UnsafeRawBufferPointer(start: m, count: size)
        let n64 = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        guard n64 <= UInt64(Self.maxHeaderBytes) else {
            throw SMoEError.file(path, "header length \(n64) exceeds the 100 MB limit (not a safetensors file?)")
        }
        let n = Int(n64)
        guard 8 + n <= size else {
            throw SMoEError.file(path, "header length \(n) runs past the end of the file (\(size) bytes): truncated?")
        }
        guard n >= 2, raw[8] == UInt8(ascii: "{") else {
            throw SMoEError.file(path, "header is not a JSON object (not a safetensors file?)")
        }
        let headerBytes = Array(raw[8..<(8 + n)])
        guard let text = String(validating: headerBytes, as: UTF8.self) else {
            throw SMoEError.file(path, "header is not valid UTF-8")
        }
        let json: JSONValue
        do { json = try JSONValue.parse(text) } catch let e as SMoEError {
            throw SMoEError.file(path, "header: \(e.message)")
        }
        guard case .object(let entries) = json else { throw SMoEError.file(path, "header is not a JSON object") }
        let dataSize = size - 8 - n
        var infos: [SafetensorsTensorInfo] = []
        var meta: [(String, String)] = []
        var seen = Set<String>()
        for (name, v) in entries {
            guard seen.insert(name).inserted else { throw SMoEError.dataset(path, name, "appears twice in the header") }
            if name == "__metadata__" {
                guard case .object(let kv) = v else { throw SMoEError.dataset(path, name, "is not an object of strings") }
                for (k, s) in kv {
                    guard let str = s.stringValue else { throw SMoEError.dataset(path, "__metadata__.\(k)", "is not a string") }
                    meta.append((k, str))
                }
                continue
            }
            guard case .object = v else { throw SMoEError.dataset(path, name, "header entry is not an object") }
            guard let dts = v["dtype"]?.stringValue else { throw SMoEError.dataset(path, name, "missing dtype") }
            guard let dt = SafetensorsDType(rawValue: dts) else {
                throw SMoEError.dataset(path, name, "unknown dtype \"\(dts)\" (supported: \(SafetensorsDType.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            guard let sa = v["shape"]?.arrayValue else { throw SMoEError.dataset(path, name, "missing shape") }
            var shape: [Int] = []
            for d in sa {
                guard case .int(let x) = d, x >= 0 else { throw SMoEError.dataset(path, name, "shape \(v["shape"]!.serialized()) is not a list of non-negative integers") }
                shape.append(x)
            }
            guard let oa = v["data_offsets"]?.arrayValue, oa.count == 2, case .int(let b) = oa[0], case .int(let e) = oa[1] else {
                throw SMoEError.dataset(path, name, "data_offsets must be two integers [begin, end]")
            }
            guard b >= 0, e >= b, e <= dataSize else {
                throw SMoEError.dataset(path, name, "data_offsets [\(b), \(e)] outside the data section (\(dataSize) bytes): truncated or corrupt")
            }
            var count = 1
            for d in shape {
                let (p, o) = count.multipliedReportingOverflow(by: d)
                guard !o else { throw SMoEError.dataset(path, name, "shape \(shape) is too large") }
                count = p
            }
            let (want, o) = count.multipliedReportingOverflow(by: dt.byteSize)
            guard !o, want == e - b else {
                throw SMoEError.dataset(path, name, "holds \(e - b) bytes but shape \(shape) of \(dt.rawValue) needs \(o ? "too many" : String(want))")
            }
            infos.append(SafetensorsTensorInfo(name: name, dtype: dt, shape: shape, begin: b, end: e))
        }
        infos.sort { ($0.begin, $0.end) < ($1.begin, $1.end) }
        for i in infos.indices.dropFirst() where infos[i].begin < infos[i - 1].end {
            throw SMoEError.dataset(path, infos[i].name, "data_offsets [\(infos[i].begin), \(infos[i].end)] overlap those of \(infos[i - 1].name) [\(infos[i - 1].begin), \(infos[i - 1].end)]")
        }
        tensors = infos
        metadata = meta
        byName = Dictionary(uniqueKeysWithValues: infos.enumerated().map { ($1.name, $0) })
        base = m
        fileSize = size
        dataStart = 8 + n
        ok = true
    }

    deinit { if let b = base { munmap(b, fileSize) } }

    public var names: [String] { tensors.map(\.name) }

    public func info(_ name: String) throws -> SafetensorsTensorInfo {
        guard let i = byName[name] else { throw SMoEError.dataset(path, name, "no such tensor") }
        return tensors[i]
    }

    public func contains(_ name: String) -> Bool { byName[name] != nil }

    /// Calls `body` with the tensor's bytes (valid only inside `body`; no copy).
    public func withBytes<T>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        let t = try info(name)
        let p = UnsafeRawBufferPointer(start: base, count: fileSize)
        return try body(UnsafeRawBufferPointer(rebasing: p[(dataStart + t.begin)..<(dataStart + t.end)]))
    }

    /// A copy of the tensor's bytes.
    public func bytes(_ name: String) throws -> [UInt8] { try withBytes(name) { Array($0) } }

    /// The tensor as Float (F32, F16, BF16 exactly; F64 rounded).
    public func floats(_ name: String) throws -> [Float] {
        let t = try info(name)
        guard t.dtype.isFloat else { throw SMoEError.dataset(path, name, "is \(t.dtype.rawValue), not a floating-point tensor") }
        return try withBytes(name) { t.dtype.decode($0) }
    }
}

/// A Hugging Face model folder: `model.safetensors`, or `model.safetensors.index.json` with
/// its shards (or a single other `*.safetensors` file). Gives name → (file, tensor) lookups.
public final class SafetensorsModel: @unchecked Sendable {
    public let directory: String
    public let files: [SafetensorsFile]
    /// The index file, when the model is sharded.
    public let indexPath: String?
    /// Every tensor name, file by file in data order.
    public let names: [String]
    private let location: [String: Int]

    public init(_ directory: String) throws {
        self.directory = directory
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDir) else { throw SMoEError.file(directory, "no such folder") }
        guard isDir.boolValue else { throw SMoEError.file(directory, "is not a folder (give the model folder holding config.json and *.safetensors)") }
        let index = directory + "/model.safetensors.index.json"
        let single = directory + "/model.safetensors"
        var files: [SafetensorsFile] = []
        var location: [String: Int] = [:]
        var names: [String] = []
        if FileManager.default.fileExists(atPath: index) {
            indexPath = index
            guard let data = FileManager.default.contents(atPath: index) else { throw SMoEError.file(index, "cannot be read") }
            let json: JSONValue
            do { json = try JSONValue.parse(String(decoding: data, as: UTF8.self)) } catch let e as SMoEError {
                throw SMoEError.file(index, e.message)
            }
            guard case .object(let wm)? = json["weight_map"] else { throw SMoEError.dataset(index, "weight_map", "missing or not an object") }
            var fileIndex: [String: Int] = [:]
            var expected: [Int: Set<String>] = [:]
            for (name, v) in wm {
                guard let fn = v.stringValue, !fn.contains("/"), fn.hasSuffix(".safetensors") else {
                    throw SMoEError.dataset(index, "weight_map.\(name)", "is not a .safetensors file name in the folder")
                }
                guard location[name] == nil else { throw SMoEError.dataset(index, "weight_map.\(name)", "appears twice") }
                let fi: Int
                if let i = fileIndex[fn] { fi = i } else {
                    fi = files.count
                    fileIndex[fn] = fi
                    files.append(try SafetensorsFile(directory + "/" + fn))
                }
                location[name] = fi
                expected[fi, default: []].insert(name)
            }
            for (fi, f) in files.enumerated() {
                for name in f.names where !(expected[fi]?.contains(name) ?? false) {
                    throw SMoEError.dataset(f.path, name, "is not listed for this file in \(index)")
                }
                for name in expected[fi] ?? [] where !f.contains(name) {
                    throw SMoEError.dataset(f.path, name, "is listed in \(index) but missing from the file")
                }
                names += f.names
            }
        } else {
            indexPath = nil
            var path = single
            if !FileManager.default.fileExists(atPath: single) {
                let all = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".safetensors") && !$0.hasPrefix(".") }.sorted()
                guard all.count == 1 else {
                    throw SMoEError.file(directory, all.isEmpty
                        ? "holds no model.safetensors or model.safetensors.index.json"
                        : "holds several .safetensors files (\(all.joined(separator: ", "))) but no model.safetensors.index.json")
                }
                path = directory + "/" + all[0]
            }
            let f = try SafetensorsFile(path)
            files = [f]
            for n in f.names { location[n] = 0 }
            names = f.names
        }
        self.files = files
        self.location = location
        self.names = names
    }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    /// The file holding `name` and the tensor's header entry.
    public func locate(_ name: String) throws -> (file: SafetensorsFile, info: SafetensorsTensorInfo) {
        guard let i = location[name] else { throw SMoEError.file(directory, "tensor \(name) is missing from the model") }
        return (files[i], try files[i].info(name))
    }

    public func info(_ name: String) throws -> SafetensorsTensorInfo { try locate(name).info }
    public func floats(_ name: String) throws -> [Float] { try locate(name).file.floats(name) }
    public func withBytes<T>(_ name: String, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        try locate(name).file.withBytes(name, body)
    }

    /// The `__metadata__` of the first file.
    public var metadata: [(String, String)] { files.first?.metadata ?? [] }
}

/// Writes one `.safetensors` file: tensors in the order added, header padded with spaces to a
/// multiple of 8 bytes. Tensor data streams to a temporary file, so memory holds one tensor;
/// `commit()` writes the file under a temporary name and renames it into place.
public final class SafetensorsWriter: @unchecked Sendable {
    public let destination: String
    private let output: AtomicOutput
    private let dataPath: String
    private let dataSlot: Int?
    private let data: FileHandle
    private var entries: [(String, JSONValue)] = []
    private var names = Set<String>()
    public private(set) var dataBytes = 0
    public private(set) var tensorNames: [String] = []
    private var finished = false

    public init(destination: String, metadata: [(String, String)] = []) throws {
        self.destination = destination
        output = try AtomicOutput(destination: destination)
        dataPath = output.temporaryPath + ".data"
        dataSlot = TemporaryFiles.register(dataPath)
        guard FileManager.default.createFile(atPath: dataPath, contents: nil),
              let h = FileHandle(forWritingAtPath: dataPath) else {
            throw SMoEError.file(destination, "cannot create a temporary file next to it")
        }
        data = h
        if !metadata.isEmpty {
            entries.append(("__metadata__", .object(metadata.map { ($0.0, .string($0.1)) })))
        }
    }

    deinit {
        if !finished {
            try? data.close()
            unlink(dataPath)
        }
        TemporaryFiles.unregister(dataSlot)
    }

    /// Appends a tensor whose little-endian bytes are `bytes`.
    public func add(_ name: String, dtype: SafetensorsDType, shape: [Int], bytes: UnsafeRawBufferPointer) throws {
        guard !name.isEmpty, name != "__metadata__", names.insert(name).inserted else {
            throw SMoEError.dataset(destination, name, "tensor name is empty, reserved or repeated")
        }
        guard let want = checkedProduct(shape + [dtype.byteSize]), bytes.count == want else {
            throw SMoEError.dataset(destination, name, "has \(bytes.count) bytes but shape \(shape) of \(dtype.rawValue) needs \(checkedProduct(shape + [dtype.byteSize]).map(String.init) ?? "too many")")
        }
        do { try data.write(contentsOf: Data(bytes)) } catch {
            throw SMoEError.file(destination, "cannot write: \(error.localizedDescription)")
        }
        entries.append((name, .object([
            ("dtype", .string(dtype.rawValue)), ("shape", .array(shape.map { .int($0) })),
            ("data_offsets", .array([.int(dataBytes), .int(dataBytes + want)])),
        ])))
        dataBytes += want
        tensorNames.append(name)
    }

    public func add(_ name: String, dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try add(name, dtype: dtype, shape: shape, bytes: $0) }
    }

    /// Appends floats encoded as `dtype` (a floating-point type).
    public func add(_ name: String, dtype: SafetensorsDType, shape: [Int], floats: [Float]) throws {
        guard dtype.isFloat else { throw SMoEError.dataset(destination, name, "cannot encode floats as \(dtype.rawValue)") }
        try add(name, dtype: dtype, shape: shape, bytes: dtype.encode(floats))
    }

    /// Writes header and data and renames the file into place.
    public func commit() throws {
        guard !finished else { return }
        finished = true
        defer { unlink(dataPath) }
        try? data.close()
        var header = Array(JSONValue.object(entries).serialized().utf8)
        while header.count % 8 != 0 { header.append(UInt8(ascii: " ")) }
        guard FileManager.default.createFile(atPath: output.temporaryPath, contents: nil),
              let out = FileHandle(forWritingAtPath: output.temporaryPath),
              let input = FileHandle(forReadingAtPath: dataPath) else {
            throw SMoEError.file(destination, "cannot be created")
        }
        do {
            var len = UInt64(header.count).littleEndian
            try out.write(contentsOf: Data(bytes: &len, count: 8))
            try out.write(contentsOf: Data(header))
            while let chunk = try input.read(upToCount: 1 << 24), !chunk.isEmpty { try out.write(contentsOf: chunk) }
            try out.close()
            try input.close()
        } catch {
            output.discard()
            throw SMoEError.file(destination, "cannot write: \(error.localizedDescription)")
        }
        try output.commit()
    }

    /// Drops the output.
    public func discard() {
        guard !finished else { return }
        finished = true
        try? data.close()
        unlink(dataPath)
        output.discard()
    }
}

/// Writes a model's tensors into a folder as Hugging Face does: one `model.safetensors` when
/// everything fits in `maxShardBytes`, otherwise `model-00001-of-0000N.safetensors` shards
/// plus `model.safetensors.index.json`. A new shard starts when the next tensor would take
/// the current one past the limit (a tensor larger than the limit gets a shard of its own).
/// The folder must exist (normally a temporary folder renamed by the caller).
public final class ShardedSafetensorsWriter: @unchecked Sendable {
    public let directory: String
    public let maxShardBytes: Int
    public let metadata: [(String, String)]
    private var current: SafetensorsWriter?
    private var shards: [(temp: String, names: [String])] = []
    public private(set) var totalBytes = 0
    public private(set) var tensorCount = 0

    public init(directory: String, maxShardBytes: Int, metadata: [(String, String)] = []) throws {
        guard maxShardBytes >= 1 else { throw SMoEError.setting(.maxShardSize, "must be positive") }
        self.directory = directory
        self.maxShardBytes = maxShardBytes
        self.metadata = metadata
    }

    private func writer(for bytes: Int) throws -> SafetensorsWriter {
        if let w = current, w.dataBytes == 0 || w.dataBytes + bytes <= maxShardBytes { return w }
        try closeShard()
        let temp = directory + "/shard-\(shards.count + 1).safetensors"
        let w = try SafetensorsWriter(destination: temp, metadata: metadata)
        current = w
        return w
    }

    private func closeShard() throws {
        guard let w = current else { return }
        try w.commit()
        shards.append((w.destination, w.tensorNames))
        current = nil
    }

    public func add(_ name: String, dtype: SafetensorsDType, shape: [Int], bytes: UnsafeRawBufferPointer) throws {
        try writer(for: bytes.count).add(name, dtype: dtype, shape: shape, bytes: bytes)
        totalBytes += bytes.count
        tensorCount += 1
    }

    public func add(_ name: String, dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try add(name, dtype: dtype, shape: shape, bytes: $0) }
    }

    /// Names the shards and writes the index; returns the file names written.
    @discardableResult
    public func finish() throws -> [String] {
        if current == nil && shards.isEmpty { _ = try writer(for: 0) }
        try closeShard()
        let n = shards.count
        if n == 1 {
            try rename(shards[0].temp, to: directory + "/model.safetensors")
            return ["model.safetensors"]
        }
        var files: [String] = []
        var map: [(String, JSONValue)] = []
        for (i, s) in shards.enumerated() {
            let name = String(format: "model-%05d-of-%05d.safetensors", i + 1, n)
            try rename(s.temp, to: directory + "/" + name)
            files.append(name)
            map += s.names.map { ($0, .string(name)) }
        }
        map.sort { $0.0 < $1.0 }
        let index: JSONValue = .object([
            ("metadata", .object([("total_size", .int(totalBytes))])),
            ("weight_map", .object(map)),
        ])
        let path = directory + "/model.safetensors.index.json"
        guard FileManager.default.createFile(atPath: path, contents: Data((index.serialized(pretty: true) + "\n").utf8)) else {
            throw SMoEError.file(path, "cannot be written")
        }
        return files + ["model.safetensors.index.json"]
    }

    private func rename(_ a: String, to b: String) throws {
        if Foundation.rename(a, b) != 0 { throw SMoEError.file(b, "cannot write: \(String(cString: strerror(errno)))") }
    }

    public func discard() { current?.discard() }
}

/// Parses a size such as `5GB`, `500MB`, `2GiB`, `10000` (bytes). Decimal units are powers of
/// 1000 (as Hugging Face), binary units (KiB, MiB, GiB) powers of 1024.
public func parseByteSize(_ text: String, for setting: Setting = .maxShardSize) throws -> Int {
    let s = text.trimmingCharacters(in: .whitespaces).uppercased()
    let units: [(String, Double)] = [("KIB", 1024), ("MIB", 1_048_576), ("GIB", 1_073_741_824), ("TIB", 1_099_511_627_776),
                                     ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("B", 1)]
    var number = s, scale = 1.0
    for (u, f) in units where s.hasSuffix(u) {
        number = String(s.dropLast(u.count)).trimmingCharacters(in: .whitespaces)
        scale = f
        break
    }
    guard let v = Double(number), v > 0, v.isFinite, v * scale >= 1, v * scale < 9e18 else {
        throw SMoEError.setting(setting, "'\(text)' is not a size such as 5GB, 500MB or 2GiB")
    }
    return Int(v * scale)
}
