/// The one error type the library throws to its callers. Its description is a single line
/// naming the file, dataset or option at fault, ready to print after `error: `.
public struct SMoEError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String

    public init(_ message: String) {
        // Keep it to one line whatever the cause said.
        self.message = message.split(whereSeparator: \.isNewline).joined(separator: " ")
    }

    public var description: String { message }

    /// A problem with a whole file.
    public static func file(_ path: String, _ what: String) -> SMoEError {
        SMoEError("\(path): \(what)")
    }

    /// A problem with one object (dataset, group or attribute) inside a file.
    public static func dataset(_ path: String, _ object: String, _ what: String) -> SMoEError {
        SMoEError("\(path): \(object): \(what)")
    }

    /// A problem with a command-line or API option.
    public static func option(_ name: String, _ what: String) -> SMoEError {
        SMoEError("\(name): \(what)")
    }
}
