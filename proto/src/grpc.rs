//! The gRPC API `capstan.v1`: messages and services generated from proto/capstan/v1/*.proto by
//! build.rs, and the encoded descriptor set that server reflection serves.

/// Messages, clients and servers of package `capstan.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("capstan.v1");
}

/// The encoded `FileDescriptorSet` of capstan/v1/*.proto and their imports (for reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capstan_v1_descriptor.bin"));

/// Re-exported so users of the generated code need no direct dependency on prost-types.
pub use prost_types;
