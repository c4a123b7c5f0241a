import XCTest
@testable import SMoECompress

final class GroupingTests: XCTestCase {
    func testUniformPicksMostUsedAndJoinsMostSimilar() throws {
        let f = [0.1, 0.4, 0.05, 0.3, 0.15]
        // Slot 0 resembles 3, slot 2 resembles 1, slot 4 ties between 1 and 3 → the more used (1).
        var s = [Double](repeating: 0, count: 25)
        func set(_ i: Int, _ j: Int, _ v: Double) { s[i * 5 + j] = v; s[j * 5 + i] = v }
        set(0, 3, 0.9); set(0, 1, 0.2); set(2, 1, 0.8); set(2, 3, 0.1); set(4, 1, 0.5); set(4, 3, 0.5)
        let g = Grouping.uniform(frequency: f, similarity: s, groups: 2)
        XCTAssertEqual(g.dominant, [1, 3])
        XCTAssertEqual(g.groups, [[1, 2, 4], [0, 3]])
        XCTAssertEqual(g.slotToGroup, [1, 0, 0, 1, 0])
    }

    /// The group count is checked once, against the model, when a merge is set up; grouping
    /// itself then only asserts it.
    func testGroupCountIsValidatedAgainstTheModel() throws {
        let model = try CheckpointReader(fixture("planted-mixtral.h5"))
        for (groups, text) in [(0, "must be at least 1"), (9, "9 is more than the 8 experts of layer")] {
            XCTAssertThrowsError(try MergeSettings(groups: groups).validate(for: model)) { e in
                XCTAssertEqual((e as? SMoEError)?.setting, .groups, "\(e)")
                XCTAssertTrue("\(e)".contains(text), "\(e)")
            }
        }
        XCTAssertEqual(try MergeSettings(groups: 8).validate(for: model), model.layers.map(\.name))
        XCTAssertThrowsError(try MergeSettings(groups: 2, layers: ["nope"]).validate(for: model)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .layers, "\(e)")
        }
        XCTAssertThrowsError(try MergeSettings(groups: 2, layers: []).validate(for: model)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .layers, "\(e)")
        }
    }

    func testUsageTiesGoToLowerIndex() {
        XCTAssertEqual(Grouping.byUsage([0.2, 0.3, 0.3, 0.2]), [1, 2, 0, 3])
    }

    /// The adaptive rule: budget respected, each layer keeps its most used slot, threshold strict.
    func testAdaptiveAllocationRules() throws {
        var rng = SplitMix64(seed: 11)
        for trial in 0..<200 {
            let layers = 1 + rng.nextInt(below: 5), e = 2 + rng.nextInt(below: 8)
            let freqs: [[Double]] = (0..<layers).map { _ in
                // Ties on purpose: quantised values.
                let raw = (0..<e).map { _ in Double(rng.nextInt(below: 5)) }
                let s = raw.reduce(0, +)
                return s == 0 ? raw.map { _ in 1 / Double(e) } : raw.map { $0 / s }
            }
            let g = 1 + rng.nextInt(below: e)
            let dom = Grouping.adaptiveDominants(frequencies: freqs, groupsPerLayer: g)
            let total = dom.reduce(0) { $0 + $1.count }
            let msg = "trial \(trial): \(freqs) G=\(g) → \(dom)"
            XCTAssertLessThanOrEqual(total, max(g * layers, layers), msg)
            for (l, d) in dom.enumerated() {
                XCTAssertFalse(d.isEmpty, msg)
                XCTAssertEqual(d.first, Grouping.byUsage(freqs[l]).first, msg)
                XCTAssertEqual(Set(d).count, d.count, msg)
            }
            // Strictness: a kept non-top slot is strictly above every dropped slot's score anywhere.
            var scores = freqs
            for l in 0..<layers { scores[l][Grouping.byUsage(freqs[l])[0]] = 1 }
            let keptMin = (0..<layers).flatMap { l in dom[l].dropFirst().map { scores[l][$0] } }.min() ?? .infinity
            let droppedMax = (0..<layers).flatMap { l in (0..<e).filter { !dom[l].contains($0) }.map { scores[l][$0] } }.max() ?? -.infinity
            XCTAssertGreaterThan(keptMin, droppedMax, msg)
        }
        // A skewed layer gives groups to a flat one.
        let d = Grouping.adaptiveDominants(frequencies: [[0.97, 0.01, 0.01, 0.01], [0.3, 0.26, 0.24, 0.2]], groupsPerLayer: 2)
        XCTAssertEqual(d.map(\.count), [1, 3])
    }

    /// Average linkage against a brute-force implementation on small random inputs.
    func testHierarchicalMatchesBruteForceAverageLinkage() throws {
        var rng = SplitMix64(seed: 12)
        for trial in 0..<100 {
            let e = 2 + rng.nextInt(below: 7)
            let pts = (0..<e).map { _ in (0..<3).map { _ in rng.nextGaussian() } }
            var dist = [Double](repeating: 0, count: e * e)
            for i in 0..<e { for j in 0..<e { dist[i * e + j] = zip(pts[i], pts[j]).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }.squareRoot() } }
            let freq = (0..<e).map { _ in rng.nextDouble() }
            let g = 1 + rng.nextInt(below: e)
            // Brute force: recompute every average from scratch each step.
            var clusters = (0..<e).map { [$0] }
            while clusters.count > g {
                var best = (Double.infinity, 0, 0)
                for i in 0..<clusters.count { for j in (i + 1)..<clusters.count {
                    var s = 0.0
                    for a in clusters[i] { for b in clusters[j] { s += dist[a * e + b] } }
                    let avg = s / Double(clusters[i].count * clusters[j].count)
                    if avg < best.0 { best = (avg, i, j) }
                } }
                clusters[best.1] += clusters[best.2]
                clusters.remove(at: best.2)
                clusters.sort { $0.min()! < $1.min()! }
            }
            let got = Grouping.hierarchical(distance: dist, frequency: freq, groups: g)
            XCTAssertEqual(Set(got.groups.map { Set($0) }), Set(clusters.map { Set($0) }), "trial \(trial)")
            for (members, dom) in zip(got.groups, got.dominant) {
                XCTAssertEqual(dom, members.max { freq[$0] < freq[$1] }, "trial \(trial)")
            }
        }
    }

    func testAdjustedRandIndex() {
        XCTAssertEqual(Grouping.adjustedRandIndex([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]), 1, accuracy: 1e-12)
        XCTAssertLessThan(Grouping.adjustedRandIndex([0, 0, 1, 1], [0, 1, 0, 1]), 0.01)
    }
}
