import Foundation
import SMoECompress

/// The hidden subcommand the tool re-executes itself with to walk an input's HDF5 metadata in a
/// child process (docs/FORMAT.md, "Damaged input").
let checkInputCommand = "__check-input"

/// Child side: walks `path`, writing one byte to fd 3 per object (the heartbeat); exits 0, or 1
/// after one `error:` line.
func runInputCheckChild(_ path: String) -> Never {
    var beat: UInt8 = 0x2E
    do {
        try HDF5InputCheck.walk(path) { _ = write(3, &beat, 1) }
        exit(0)
    } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        exit(1)
    }
}

/// Seconds without a heartbeat after which the child is taken to loop (SMOE_INPUT_CHECK_STALL).
let inputCheckStallSeconds: Double = {
    if let s = ProcessInfo.processInfo.environment["SMOE_INPUT_CHECK_STALL"], let v = Double(s), v > 0 { return v }
    return 4
}()

/// Parent side (installed as `HDF5InputCheck.isolatedRunner`): runs `smoe-compress
/// __check-input PATH` and turns its error, crash or stall into one `SMoEError` naming the file.
@Sendable func runInputCheckIsolated(_ path: String) throws {
    var beatPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
    guard cloexecPipe(&beatPipe) else { throw SMoEError.file(path, "cannot check: \(String(cString: strerror(errno)))") }
    guard cloexecPipe(&errPipe) else {
        close(beatPipe[0]); close(beatPipe[1])
        throw SMoEError.file(path, "cannot check: \(String(cString: strerror(errno)))")
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    posix_spawn_file_actions_adddup2(&actions, beatPipe[1], 3)
    // No Swift backtrace in the child: its crash is an expected outcome, reported in one line.
    let env = ProcessInfo.processInfo.environment.filter { $0.key != "SWIFT_BACKTRACE" }.map { "\($0.key)=\($0.value)" }
        + ["SWIFT_BACKTRACE=enable=no"]
    let argv = ["smoe-compress", checkInputCommand, path]
    var cArgs = argv.map { strdup($0) } + [nil]
    var cEnv = env.map { strdup($0) } + [nil]
    defer { for p in cArgs + cEnv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, "/proc/self/exe", &actions, nil, &cArgs, &cEnv)
    close(beatPipe[1]); close(errPipe[1])
    defer { close(beatPipe[0]); close(errPipe[0]) }
    guard rc == 0 else { throw SMoEError.file(path, "cannot check: \(String(cString: strerror(rc)))") }

    var errText = [UInt8](), buf = [UInt8](repeating: 0, count: 4096)
    var open = (beat: true, err: true), stalled = false
    var last = Date()
    while open.beat || open.err {
        var fds = [pollfd(fd: open.beat ? beatPipe[0] : -1, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: open.err ? errPipe[0] : -1, events: Int16(POLLIN), revents: 0)]
        let left = inputCheckStallSeconds - Date().timeIntervalSince(last)
        if left <= 0 { stalled = true; break }
        let n = poll(&fds, 2, Int32(max(1, left * 1000)))
        if n < 0 && errno == EINTR { continue }
        if fds[0].revents != 0 {
            let r = read(beatPipe[0], &buf, buf.count)
            if r > 0 { last = Date() } else if r == 0 || errno != EINTR { open.beat = false }
        }
        if fds[1].revents != 0 {
            let r = read(errPipe[0], &buf, buf.count)
            if r > 0 { if errText.count < 65536 { errText += buf[0..<r] } } else if r == 0 || errno != EINTR { open.err = false }
        }
    }
    if stalled { kill(pid, SIGKILL) }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    if stalled {
        throw SMoEError.file(path, "timed out reading the HDF5 structure (libhdf5 made no progress for \(Int(inputCheckStallSeconds)) s; damaged file?)")
    }
    let signal = status & 0x7F, code = (status >> 8) & 0xFF
    if signal != 0 {
        throw SMoEError.file(path, "damaged HDF5 structure (libhdf5 crashed reading its metadata: signal \(signal))")
    }
    if code == 0 { return }
    let line = String(decoding: errText, as: UTF8.self).split(whereSeparator: \.isNewline)
        .first(where: { $0.hasPrefix("error: ") }).map { String($0.dropFirst(7)) }
    // The child checked `path` alone: its error line is about that file.
    throw SMoEError(line ?? "\(path): could not be checked (checker exited with status \(code))", file: path)
}

private func cloexecPipe(_ fds: inout [Int32]) -> Bool {
    guard pipe(&fds) == 0 else { return false }
    for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    return true
}

// MARK: signals

/// The actions in place before ours, for the crash signals (chained to after clean-up).
nonisolated(unsafe) private let previousActions = UnsafeMutablePointer<sigaction>.allocate(capacity: 65)

/// "error: interrupted (SIGINT)\n" etc., computed before any signal can arrive.
nonisolated(unsafe) private let interruptMessages: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = {
    let p = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: 65)
    p.initialize(repeating: nil, count: 65)
    p[Int(SIGINT)] = strdup("error: interrupted (SIGINT); temporary output removed\n")
    p[Int(SIGTERM)] = strdup("error: terminated (SIGTERM); temporary output removed\n")
    p[Int(SIGHUP)] = strdup("error: hung up (SIGHUP); temporary output removed\n")
    return p
}()

/// SIGINT, SIGTERM and SIGHUP remove the temporary outputs and exit 128 + signal; the crash
/// signals remove them and then fall through to the previous handler (Swift's backtracer, or the
/// default action), so a crash still shows as a crash. Handlers are async-signal-safe.
func installSignalHandlers() {
    TemporaryFiles.prepare()
    _ = interruptMessages
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        var sa = sigaction()
        sa.__sigaction_handler.sa_handler = { sig in
            TemporaryFiles.removeAllNow()
            if let m = interruptMessages[Int(sig)] { _ = write(2, m, strlen(m)) }
            _exit(128 + sig)
        }
        sigemptyset(&sa.sa_mask)
        sigaction(sig, &sa, nil)
    }
    for sig in [SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP] {
        var sa = sigaction()
        sa.__sigaction_handler.sa_handler = { sig in
            TemporaryFiles.removeAllNow()
            sigaction(sig, previousActions + Int(sig), nil)  // the fault repeats into the previous handler
            if sig == SIGABRT || sig == SIGTRAP { raise(sig) }
        }
        sigemptyset(&sa.sa_mask)
        sa.sa_flags = Int32(SA_ONSTACK | SA_NODEFER)
        sigaction(sig, &sa, previousActions + Int(sig))
    }
}
