import SMoECompress

/// Placeholder until this benchmark lands.
func lowRankBench(_ args: [String]) throws {
    print("not yet implemented")
}
