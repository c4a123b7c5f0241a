// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "smoe-compress",
    products: [
        .library(name: "SMoECompress", targets: ["SMoECompress"]),
        .executable(name: "smoe-compress", targets: ["smoe-compress"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CHDF5", path: "Sources/CHDF5", pkgConfig: "hdf5-serial",
            providers: [.apt(["libhdf5-dev"])]),
        .systemLibrary(
            name: "CLinAlg", path: "Sources/CLinAlg", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]),
        .target(name: "SMoECompress", dependencies: ["CHDF5", "CLinAlg"]),
        .executableTarget(
            name: "smoe-compress",
            dependencies: [
                "SMoECompress",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .executableTarget(name: "smoe-bench", dependencies: ["SMoECompress"]),
        .testTarget(
            name: "SMoECompressTests",
            dependencies: ["SMoECompress", "smoe-compress"],
            resources: []),
    ]
)
