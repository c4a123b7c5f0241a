import CHDF5
import Foundation

extension H5Dataset {
    /// The first up to 64 values of the first row of the first and the last entry along the
    /// first dimension (for a 1-D dataset, its first 64 values), as stored (raw bytes).
    func sampleRaw() throws -> [UInt8] {
        guard let type = rawElementType, elementCount > 0 else { return [] }
        if shape.count <= 1 {
            return try sampleRaw(start: [0], count: [min(shape.first ?? 1, 64)], type: type)
        }
        var out: [UInt8] = []
        for first in Set([0, shape[0] - 1]).sorted() {
            var start = [Int](repeating: 0, count: shape.count)
            start[0] = first
            var count = [Int](repeating: 1, count: shape.count)
            count[shape.count - 1] = min(shape[shape.count - 1], 64)
            out += try sampleRaw(start: start, count: count, type: type)
        }
        return out
    }

    private func sampleRaw(start: [Int], count: [Int], type: RawElementType) throws -> [UInt8] {
        let n = count.reduce(1, *)
        var out = [UInt8](repeating: 0, count: n * type.byteSize)
        let fs = H5Dget_space(id)
        defer { H5Sclose(fs) }
        if shape.isEmpty {
            H5Sselect_all(fs)
        } else {
            H5Sselect_hyperslab(fs, H5S_SELECT_SET, start.map { hsize_t($0) }, nil, count.map { hsize_t($0) }, nil)
        }
        let ms = H5Screate_simple(1, [hsize_t(n)], nil)
        defer { H5Sclose(ms) }
        let t = type.h5Type()
        defer { H5Tclose(t) }
        let status = out.withUnsafeMutableBytes { H5Dread(id, t, ms, fs, hid_t(H5P_DEFAULT), $0.baseAddress) }
        if status < 0 { throw fail("cannot be read (damaged file?)") }
        return out
    }
}
