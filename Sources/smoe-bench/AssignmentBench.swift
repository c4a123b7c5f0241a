import SMoECompress

/// Placeholder until this benchmark lands.
func assignmentBench(_ args: [String]) throws {
    print("not yet implemented")
}
