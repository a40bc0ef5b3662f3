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

/// The codec of the generated services: prost's, except that a message that does not decode
/// (bad wire format, a string field that is not UTF-8) is `INVALID_ARGUMENT`, the sender's
/// mistake, where tonic answers `INTERNAL`. The API's error table promises one code for every
/// malformed input, whichever way it arrives.
pub mod codec {
    use tonic::Status;
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// prost's codec with [`InvalidMessage`] decoding.
    #[derive(Debug)]
    pub struct CheckedCodec<T, U>(tonic_prost::ProstCodec<T, U>);

    impl<T, U> Default for CheckedCodec<T, U> {
        fn default() -> Self {
            CheckedCodec(tonic_prost::ProstCodec::default())
        }
    }

    impl<T, U> Codec for CheckedCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = InvalidMessage<U>;

        fn encoder(&mut self) -> Self::Encoder {
            self.0.encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            InvalidMessage(self.0.decoder())
        }
    }

    /// prost's decoder, with decode failures as `INVALID_ARGUMENT`.
    #[derive(Debug)]
    pub struct InvalidMessage<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for InvalidMessage<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0
                .decode(buf)
                .map_err(|s| Status::invalid_argument(format!("the message does not decode: {}", s.message())))
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
