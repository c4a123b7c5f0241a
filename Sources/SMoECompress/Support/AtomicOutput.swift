import Foundation

/// An output file written under a temporary name in the destination's folder and renamed
/// into place only by `commit()`, so a failure never leaves a partial file behind.
public final class AtomicOutput: @unchecked Sendable {
    public let destination: String
    public let temporaryPath: String
    private var done = false

    public init(destination: String) throws {
        let url = URL(fileURLWithPath: destination)
        let dir = url.deletingLastPathComponent().path
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
            throw SMoEError.file(destination, "output folder \(dir) does not exist")
        }
        if FileManager.default.fileExists(atPath: destination, isDirectory: &isDir), isDir.boolValue {
            throw SMoEError.file(destination, "output path is a directory")
        }
        self.destination = destination
        let salt = UInt64.random(in: 0..<UInt64.max, using: &SystemRandomNumberGenerator.shared)
        self.temporaryPath = dir + "/." + url.lastPathComponent + ".tmp-\(getpid())-\(String(salt, radix: 36))"
    }

    /// Moves the temporary file onto the destination.
    public func commit() throws {
        guard !done else { return }
        if rename(temporaryPath, destination) != 0 {
            let err = String(cString: strerror(errno))
            discard()
            throw SMoEError.file(destination, "cannot write: \(err)")
        }
        done = true
    }

    /// Removes the temporary file.
    public func discard() {
        guard !done else { return }
        unlink(temporaryPath)
        done = true
    }

    deinit { discard() }
}

extension SystemRandomNumberGenerator {
    nonisolated(unsafe) static var shared = SystemRandomNumberGenerator()
}

/// Throws when `output` names the same file as any of `inputs` (inputs are never modified).
public func ensureOutputDiffers(_ output: String, from inputs: [String]) throws {
    let o = URL(fileURLWithPath: output).standardizedFileURL.resolvingSymlinksInPath().path
    for i in inputs {
        let p = URL(fileURLWithPath: i).standardizedFileURL.resolvingSymlinksInPath().path
        if p == o { throw SMoEError.file(output, "output would overwrite the input \(i)") }
    }
}
