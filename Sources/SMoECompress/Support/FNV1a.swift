/// FNV-1a, 64 bits: a small, fast, non-cryptographic hash (fingerprints, not security).
struct FNV1a {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    mutating func add(bytes: some Sequence<UInt8>) {
        for b in bytes { value = (value ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
    }

    /// Adds a string and a separator, so ("ab", "c") and ("a", "bc") differ.
    mutating func add(_ s: String) {
        add(bytes: s.utf8)
        add(bytes: [0])
    }

    var hex: String {
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    static func hex(_ s: String) -> String {
        var h = FNV1a()
        h.add(bytes: s.utf8)
        return h.hex
    }
}
