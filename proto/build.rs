//! Generates the gRPC code of capstan/v1/*.proto when the `grpc` feature is on: protox parses the
//! files (pure Rust, no protoc), tonic-prost-build writes the messages and services, and the
//! encoded descriptor set is kept for server reflection.

fn main() {
    #[cfg(feature = "grpc")]
    if let Err(e) = grpc::generate() {
        // A build script reports failure by exiting non-zero; the message says which file broke.
        eprintln!("capstan-proto: cannot generate the gRPC code: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "grpc")]
mod grpc {
    use std::path::PathBuf;

    use prost::Message;

    const FILES: &[&str] = &[
        "capstan/v1/definitions.proto",
        "capstan/v1/runs.proto",
        "capstan/v1/events.proto",
        "capstan/v1/evaluations.proto",
    ];

    pub fn generate() -> Result<(), Box<dyn std::error::Error>> {
        for f in FILES {
            println!("cargo:rerun-if-changed={f}");
        }
        let fds = protox::compile(FILES, ["."])?;
        let out = PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("capstan_v1_descriptor.bin"), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .codec_path("crate::grpc::codec::CheckedCodec")
            .compile_fds(fds)?;
        Ok(())
    }
}
