/// The k-th largest value (k ≥ 1) of `a` by in-place quickselect (reorders `a`).
func quickselectLargest(_ a: inout [Float], _ k: Int) -> Float {
    precondition(k >= 1 && k <= a.count)
    let target = a.count - k  // index in ascending order
    return a.withUnsafeMutableBufferPointer { p -> Float in
        var lo = 0, hi = p.count - 1
        var state: UInt64 = 0x2545_F491_4F6C_DD1D
        while lo < hi {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            let pivot = p[lo + Int((state >> 33) % UInt64(hi - lo + 1))]
            // Three-way partition: [< pivot][== pivot][> pivot].
            var lt = lo, i = lo, gt = hi
            while i <= gt {
                if p[i] < pivot { p.swapAt(lt, i); lt += 1; i += 1 } else if p[i] > pivot { p.swapAt(i, gt); gt -= 1 } else { i += 1 }
            }
            if target < lt { hi = lt - 1 } else if target > gt { lo = gt + 1 } else { return pivot }
        }
        return p[lo]
    }
}
