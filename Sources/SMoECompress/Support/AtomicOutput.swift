import Foundation

/// An output file written under a temporary name in the destination's folder and renamed
/// into place only by `commit()`, so a failure never leaves a partial file behind. The temporary
/// file is registered with `TemporaryFiles`, so a signal handler can remove it too.
public final class AtomicOutput: @unchecked Sendable {
    public let destination: String
    public let temporaryPath: String
    private var done = false
    private let slot: Int?

    public init(destination: String) throws {
        try checkOutputFile(destination)
        self.destination = destination
        let url = URL(fileURLWithPath: destination)
        let dir = url.deletingLastPathComponent().path
        let salt = UInt64.random(in: 0..<UInt64.max, using: &SystemRandomNumberGenerator.shared)
        let suffix = ".tmp-\(getpid())-\(String(salt, radix: 36))"
        var name = "." + url.lastPathComponent
        // Within NAME_MAX (255 bytes) whatever the output's name: a long one is replaced by its hash.
        if name.utf8.count + suffix.utf8.count + 5 > 255 { name = ".smoe-" + stableHash(url.lastPathComponent) }
        self.temporaryPath = dir + "/" + name + suffix
        slot = TemporaryFiles.register(temporaryPath)
    }

    /// Syncs the temporary file to disk and moves it onto the destination; on any failure the
    /// temporary file is removed and an existing destination is left as it was.
    public func commit() throws {
        guard !done else { return }
        let fd = open(temporaryPath, O_RDONLY)
        if fd < 0 || fsync(fd) != 0 {
            let err = String(cString: strerror(errno))
            if fd >= 0 { Foundation.close(fd) }
            discard()
            throw SMoEError.file(destination, "cannot write: \(err)", kind: .output)
        }
        Foundation.close(fd)
        if rename(temporaryPath, destination) != 0 {
            let err = String(cString: strerror(errno))
            discard()
            throw SMoEError.file(destination, "cannot write: \(err)", kind: .output)
        }
        done = true
        TemporaryFiles.unregister(slot)
        let dirfd = open(URL(fileURLWithPath: destination).deletingLastPathComponent().path, O_RDONLY | O_DIRECTORY)
        if dirfd >= 0 { _ = fsync(dirfd); Foundation.close(dirfd) }
    }

    /// Removes the temporary file.
    public func discard() {
        guard !done else { return }
        unlink(temporaryPath)
        done = true
        TemporaryFiles.unregister(slot)
    }

    deinit { discard() }
}

/// An output path as its folder, as given and ending in `/` (empty for the current folder), and
/// its file name: `runs/out.h5` → (`runs/`, `out.h5`).
func splitOutputPath(_ path: String) -> (folder: String, name: String) {
    guard let slash = path.lastIndex(of: "/") else { return ("", path) }
    return (String(path[...slash]), String(path[path.index(after: slash)...]))
}

/// 64-bit FNV-1a of `s`, in hex (stable across runs, unlike `hashValue`).
func stableHash(_ s: String) -> String {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return String(h, radix: 16)
}

/// Checks that `path` can name an output file before any work is done: not empty, not ending in
/// `/`, not an existing folder, FIFO or device, a name within NAME_MAX, in an existing writable
/// folder. (Commands writing a file call it through `ensureOutputDiffers`; `AtomicOutput` again.)
public func checkOutputFile(_ path: String) throws {
    guard !path.isEmpty else { throw SMoEError.file("''", "the output path is empty") }
    guard !path.hasSuffix("/") else { throw SMoEError.file(path, "output path names a folder, not a file") }
    let url = URL(fileURLWithPath: path)
    guard url.lastPathComponent.utf8.count <= 255 else { throw SMoEError.file(path, "output file name is longer than 255 bytes") }
    var st = stat()
    if stat(path, &st) == 0 {
        if (st.st_mode & S_IFMT) == S_IFDIR { throw SMoEError.file(path, "output path is a directory") }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw SMoEError.file(path, "output path exists and is not a regular file (a FIFO, socket or device is never replaced)")
        }
    }
    let dir = url.deletingLastPathComponent().path
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
        throw SMoEError.file(path, "output folder \(dir) does not exist")
    }
    guard access(dir, W_OK | X_OK) == 0 else { throw SMoEError.file(path, "output folder \(dir) is not writable") }
}

/// The temporary files of the outputs being written, for a signal handler to remove
/// (`removeAllNow()` is async-signal-safe: it only reads pre-computed C strings and calls `unlink`).
public enum TemporaryFiles {
    static let capacity = 256
    nonisolated(unsafe) static let slots: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = {
        let p = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: capacity)
        p.initialize(repeating: nil, count: capacity)
        return p
    }()
    private static let lock = NSLock()

    /// Prepares the registry (call once before installing signal handlers that use it).
    public static func prepare() { _ = slots }

    /// Registers `path`; returns its slot (nil when the registry is full).
    static func register(_ path: String) -> Int? {
        lock.lock()
        defer { lock.unlock() }
        guard let i = (0..<capacity).first(where: { slots[$0] == nil }) else { return nil }
        slots[i] = strdup(path)
        return i
    }

    static func unregister(_ slot: Int?) {
        guard let i = slot else { return }
        lock.lock()
        defer { lock.unlock() }
        let p = slots[i]
        slots[i] = nil
        // Not freed: a signal handler may be reading it this instant (a few bytes per output).
        _ = p
    }

    /// Unlinks every registered temporary file. Async-signal-safe.
    public static func removeAllNow() {
        for i in 0..<capacity { if let p = slots[i] { unlink(p) } }
    }
}

extension SystemRandomNumberGenerator {
    nonisolated(unsafe) static var shared = SystemRandomNumberGenerator()
}

/// Throws when `output` names the same file as any of `inputs` (inputs are never modified), or
/// cannot name an output (`checkOutputFile`; an empty folder is accepted, for `export`).
public func ensureOutputDiffers(_ output: String, from inputs: [String]) throws {
    var isDir: ObjCBool = false
    if !(FileManager.default.fileExists(atPath: output, isDirectory: &isDir) && isDir.boolValue && !output.hasSuffix("/")) {
        try checkOutputFile(output)
    }
    let o = URL(fileURLWithPath: output).standardizedFileURL.resolvingSymlinksInPath().path
    for i in inputs {
        let p = URL(fileURLWithPath: i).standardizedFileURL.resolvingSymlinksInPath().path
        if p == o { throw SMoEError.file(output, "output would overwrite the input \(i)") }
    }
}

/// Throws unless `path` is a regular file (after symbolic links): a FIFO would block the reader
/// forever and a device is no checkpoint.
public func requireRegularFile(_ path: String) throws {
    var st = stat()
    guard stat(path, &st) == 0 else { throw SMoEError.file(path, "no such file") }
    if (st.st_mode & S_IFMT) == S_IFDIR { throw SMoEError.file(path, "is a directory, not a file") }
    guard (st.st_mode & S_IFMT) == S_IFREG else { throw SMoEError.file(path, "is not a regular file (a FIFO, socket or device is not read)") }
}

/// A temporary file that an earlier process left for an output (`AtomicOutput`'s
/// `.<name>.tmp-<pid>-<salt>`, e.g. after `kill -9`, power loss or the out-of-memory killer).
public struct LeftoverTemporaryFile: Sendable {
    public var path: String
    public var pid: Int32
    /// Whether the process that wrote it is still running (then it is left alone).
    public var running: Bool
}

extension AtomicOutput {
    /// The temporary files of `destination` in its folder written by other processes (call before
    /// this process makes its own). A file whose process is gone is removed unless `remove` is
    /// false; one whose process still runs smoe-compress is left alone. Reported either way.
    public static func leftovers(of destination: String, remove: Bool = true) -> [LeftoverTemporaryFile] {
        let (folder, base) = splitOutputPath(destination)
        let prefixes = ["." + base + ".tmp-", ".smoe-" + stableHash(base) + ".tmp-"]
        var out: [LeftoverTemporaryFile] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: folder.isEmpty ? "." : folder)) ?? [] {
            guard let prefix = prefixes.first(where: name.hasPrefix) else { continue }
            let rest = name.dropFirst(prefix.count).split(separator: "-", maxSplits: 1)
            guard rest.count == 2, let pid = Int32(rest[0]), pid > 0 else { continue }
            let path = folder + name
            var st = stat()
            guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            let running = pid != getpid() && isRunningSMoECompress(pid)
            if !running && remove { unlink(path) }
            out.append(LeftoverTemporaryFile(path: path, pid: pid, running: running))
        }
        return out.sorted { $0.path < $1.path }
    }

    /// Whether process `pid` exists and runs this tool (a reused pid of another program does not
    /// count); when /proc does not say, any existing process counts.
    static func isRunningSMoECompress(_ pid: Int32) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let comm = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8) else { return true }
        let mine = (try? String(contentsOfFile: "/proc/self/comm", encoding: .utf8)) ?? "smoe-compress"
        return comm.trimmingCharacters(in: .whitespacesAndNewlines) == mine.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
