import SMoECompress

/// Placeholder until this benchmark lands.
func mergeBench(_ args: [String]) throws {
    print("not yet implemented")
}
