import Foundation

/// A JSON value with ordered object keys, for `--json` reports and the checkpoint `history`.
public indirect enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool { a.serialized() == b.serialized() }

    public subscript(key: String) -> JSONValue? {
        if case .object(let kv) = self { return kv.first(where: { $0.0 == key })?.1 }
        return nil
    }

    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var intValue: Int? {
        switch self {
        case .int(let i): return i
        case .double(let d): return Int(exactly: d)  // nil for 8.5, 2^63, 1e300 (never traps)
        default: return nil
        }
    }
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }

    /// The first key that appears twice in one object, searching nested objects and arrays,
    /// as a dotted path (`text_config.num_experts`, `layers[2].name`); nil when keys are unique.
    public func firstDuplicateKey() -> String? {
        switch self {
        case .object(let kv):
            var seen = Set<String>()
            for (k, _) in kv where !seen.insert(k).inserted { return k }
            for (k, v) in kv { if let d = v.firstDuplicateKey() { return k + (d.hasPrefix("[") ? "" : ".") + d } }
        case .array(let a):
            for (i, v) in a.enumerated() { if let d = v.firstDuplicateKey() { return "[\(i)]" + (d.hasPrefix("[") ? "" : ".") + d } }
        default: break
        }
        return nil
    }

    /// Compact (one line) or pretty (2-space indent) JSON text.
    public func serialized(pretty: Bool = false) -> String {
        var out = ""
        write(into: &out, pretty: pretty, indent: 0)
        return out
    }

    /// JSON text in which every finite double is written in its shortest form that parses
    /// back to the same bits (`serialized` keeps 9 significant digits), always with a `.` or an
    /// exponent, so `parse` returns an equal value (resume part files keep history pieces so).
    public func serializedExactly(pretty: Bool = false) -> String {
        var out = ""
        write(into: &out, pretty: pretty, indent: 0, exact: true)
        return out
    }

    private func write(into out: inout String, pretty: Bool, indent: Int, exact: Bool = false) {
        let nl = pretty ? "\n" : ""
        let pad = pretty ? String(repeating: "  ", count: indent + 1) : ""
        let endPad = pretty ? String(repeating: "  ", count: indent) : ""
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d):
            if exact && d.isFinite { out += "\(d)" } else if !d.isFinite { out += "null" } else if d == d.rounded(), abs(d) < 1e15 { out += String(format: "%.1f", d) } else {
                out += String(format: "%.9g", d)
            }
        case .string(let s): out += Self.quote(s)
        case .array(let a):
            if a.isEmpty { out += "[]"; return }
            // Arrays of scalars stay on one line even when pretty.
            let scalar = a.allSatisfy { if case .array = $0 { return false }; if case .object = $0 { return false }; return true }
            if scalar || !pretty {
                out += "["
                for (i, v) in a.enumerated() {
                    if i > 0 { out += pretty ? ", " : "," }
                    v.write(into: &out, pretty: false, indent: 0, exact: exact)
                }
                out += "]"
            } else {
                out += "[" + nl
                for (i, v) in a.enumerated() {
                    out += pad
                    v.write(into: &out, pretty: pretty, indent: indent + 1, exact: exact)
                    out += (i < a.count - 1 ? "," : "") + nl
                }
                out += endPad + "]"
            }
        case .object(let kv):
            if kv.isEmpty { out += "{}"; return }
            out += "{" + nl
            for (i, (k, v)) in kv.enumerated() {
                out += pad + Self.quote(k) + (pretty ? ": " : ":")
                v.write(into: &out, pretty: pretty, indent: indent + 1, exact: exact)
                out += (i < kv.count - 1 ? "," : "") + nl
            }
            out += endPad + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 { out += String(format: "\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }

    /// Parses JSON text (object key order is preserved).
    public static func parse(_ text: String) throws -> JSONValue {
        var p = JSONParser(bytes: Array(text.utf8))
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.pos == p.bytes.count else { throw p.error("trailing characters") }
        return v
    }
}

/// A small strict JSON parser (RFC 8259) that keeps object keys in order.
struct JSONParser {
    let bytes: [UInt8]
    var pos = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    func error(_ what: String) -> SMoEError { SMoEError("invalid JSON at byte \(pos): \(what)") }

    mutating func skipSpace() {
        while pos < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[pos]) { pos += 1 }
    }

    mutating func expect(_ lit: String) throws {
        let u = Array(lit.utf8)
        guard pos + u.count <= bytes.count, Array(bytes[pos..<(pos + u.count)]) == u else { throw error("expected \(lit)") }
        pos += u.count
    }

    mutating func value(depth: Int) throws -> JSONValue {
        guard depth < 512 else { throw error("nested too deeply") }
        guard pos < bytes.count else { throw error("unexpected end") }
        switch bytes[pos] {
        case UInt8(ascii: "{"):
            pos += 1
            var kv: [(String, JSONValue)] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(kv) }
            while true {
                skipSpace()
                guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw error("expected a key") }
                let k = try string()
                skipSpace()
                try expect(":")
                skipSpace()
                kv.append((k, try value(depth: depth + 1)))
                skipSpace()
                guard pos < bytes.count else { throw error("unexpected end") }
                if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                if bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(kv) }
                throw error("expected , or }")
            }
        case UInt8(ascii: "["):
            pos += 1
            var a: [JSONValue] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(a) }
            while true {
                skipSpace()
                a.append(try value(depth: depth + 1))
                skipSpace()
                guard pos < bytes.count else { throw error("unexpected end") }
                if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                if bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(a) }
                throw error("expected , or ]")
            }
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        default: return try number()
        }
    }

    mutating func string() throws -> String {
        pos += 1  // opening quote
        var out: [UInt8] = []
        while true {
            guard pos < bytes.count else { throw error("unterminated string") }
            let c = bytes[pos]
            pos += 1
            if c == UInt8(ascii: "\"") { break }
            if c < 0x20 { throw error("control character in string") }
            if c != UInt8(ascii: "\\") { out.append(c); continue }
            guard pos < bytes.count else { throw error("unterminated escape") }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var code = try hex4()
                if (0xD800..<0xDC00).contains(code), pos + 1 < bytes.count, bytes[pos] == UInt8(ascii: "\\"),
                    bytes[pos + 1] == UInt8(ascii: "u")
                {
                    pos += 2
                    let low = try hex4()
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                }
                out.append(contentsOf: Array(String(Unicode.Scalar(code) ?? "\u{FFFD}").utf8))
            default: throw error("bad escape")
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    mutating func hex4() throws -> UInt32 {
        guard pos + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[pos..<(pos + 4)], as: UTF8.self), radix: 16)
        else { throw error("bad \\u escape") }
        pos += 4
        return v
    }

    mutating func number() throws -> JSONValue {
        let start = pos
        var isInt = true
        while pos < bytes.count {
            let c = bytes[pos]
            if (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "-") || c == UInt8(ascii: "+") { pos += 1 } else if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") {
                isInt = false
                pos += 1
            } else { break }
        }
        let text = String(decoding: bytes[start..<pos], as: UTF8.self)
        if text.isEmpty { throw error("unexpected character") }
        if isInt, let i = Int(text) { return .int(i) }
        guard let d = Double(text) else { throw error("bad number \(text)") }
        return .double(d)
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) { self = .object(elements) }
}

extension JSONValue {
    public init(_ s: String) { self = .string(s) }
    public init(_ i: Int) { self = .int(i) }
    public init(_ d: Double) { self = .double(d) }
    public init(_ a: [Int]) { self = .array(a.map { .int($0) }) }
    public init(_ a: [Double]) { self = .array(a.map { .double($0) }) }
    public init(_ a: [String]) { self = .array(a.map { .string($0) }) }
}

extension JSONValue {
    /// An object with `extra` keys appended (other values unchanged).
    func adding(_ extra: [(String, JSONValue)]) -> JSONValue {
        guard case .object(let kv) = self else { return self }
        return .object(kv + extra)
    }
}
