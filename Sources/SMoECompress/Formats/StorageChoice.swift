/// A stored float type as a command asks for it: one type, or `auto`, which keeps an input's
/// float16 or bfloat16 and makes anything else float32.
public enum StorageChoice: String, Sendable, CaseIterable {
    case auto, f32, f16, bf16

    /// The type to store for an input stored as `source` (nil: unknown, float32 under `auto`).
    public func resolved(keeping source: StorageType?) -> StorageType {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .auto: return source == .f16 || source == .bf16 ? source! : .f32
        }
    }
}
