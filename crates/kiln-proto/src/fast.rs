//! Zero-copy wire types for the hot CAS and ByteStream RPCs.
//!
//! The upstream generated messages hold payloads as `Vec<u8>` and digest
//! hashes as `String`, so decoding copies every payload and allocates every
//! hash. The messages here declare the same fields with the same numbers,
//! but `bytes` and `string` fields that carry data or hashes are
//! [`bytes::Bytes`]: protobuf `string` and `bytes` share one wire format,
//! and prost decodes a `Bytes` field by slicing the buffer it decodes from
//! (tonic's receive buffer), without copying. Clients see the identical
//! protocol.
//!
//! [`bytestream`] and [`cas`] hold tonic servers and clients generated for
//! `google.bytestream.ByteStream` and
//! `build.bazel.remote.execution.v2.ContentAddressableStorage` (by
//! `build.rs`) over these messages; their cold methods (GetTree, the
//! split/splice methods, QueryWriteStatus) use the upstream messages.
//!
//! A `Bytes` hash is not checked for UTF-8 when decoded: servers validate
//! hashes as lowercase hex anyway, and [`Digest::hash_str`] is the checked
//! view.

use bytes::Bytes;

/// `build.bazel.remote.execution.v2.Digest` with the hash as bytes.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Digest {
    /// The lowercase hex hash (a protobuf `string` on the wire).
    #[prost(bytes = "bytes", tag = "1")]
    pub hash: Bytes,
    #[prost(int64, tag = "2")]
    pub size_bytes: i64,
}

impl Digest {
    /// The hash as text, if it is UTF-8 (what a protobuf `string` must be).
    pub fn hash_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.hash).ok()
    }
}

impl From<crate::reapi::Digest> for Digest {
    fn from(d: crate::reapi::Digest) -> Self {
        Digest {
            hash: Bytes::from(d.hash.into_bytes()),
            size_bytes: d.size_bytes,
        }
    }
}

impl From<&crate::reapi::Digest> for Digest {
    fn from(d: &crate::reapi::Digest) -> Self {
        Digest {
            hash: Bytes::copy_from_slice(d.hash.as_bytes()),
            size_bytes: d.size_bytes,
        }
    }
}

/// `google.bytestream.ReadResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadResponse {
    #[prost(bytes = "bytes", tag = "10")]
    pub data: Bytes,
}

/// `google.bytestream.WriteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// Set on the first request of a stream; may be empty on later ones.
    #[prost(string, tag = "1")]
    pub resource_name: String,
    #[prost(int64, tag = "2")]
    pub write_offset: i64,
    #[prost(bool, tag = "3")]
    pub finish_write: bool,
    #[prost(bytes = "bytes", tag = "10")]
    pub data: Bytes,
}

/// `build.bazel.remote.execution.v2.FindMissingBlobsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FindMissingBlobsRequest {
    #[prost(string, tag = "1")]
    pub instance_name: String,
    #[prost(message, repeated, tag = "2")]
    pub blob_digests: Vec<Digest>,
    #[prost(enumeration = "crate::reapi::digest_function::Value", tag = "3")]
    pub digest_function: i32,
}

/// `build.bazel.remote.execution.v2.FindMissingBlobsResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FindMissingBlobsResponse {
    #[prost(message, repeated, tag = "2")]
    pub missing_blob_digests: Vec<Digest>,
}

/// `build.bazel.remote.execution.v2.BatchUpdateBlobsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchUpdateBlobsRequest {
    #[prost(string, tag = "1")]
    pub instance_name: String,
    #[prost(message, repeated, tag = "2")]
    pub requests: Vec<batch_update_blobs_request::Request>,
    #[prost(enumeration = "crate::reapi::digest_function::Value", tag = "5")]
    pub digest_function: i32,
}

pub mod batch_update_blobs_request {
    use bytes::Bytes;

    /// One blob of a BatchUpdateBlobsRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, optional, tag = "1")]
        pub digest: Option<super::Digest>,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
        #[prost(enumeration = "crate::reapi::compressor::Value", tag = "3")]
        pub compressor: i32,
    }
}

/// `build.bazel.remote.execution.v2.BatchUpdateBlobsResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchUpdateBlobsResponse {
    #[prost(message, repeated, tag = "1")]
    pub responses: Vec<batch_update_blobs_response::Response>,
}

pub mod batch_update_blobs_response {
    /// The outcome for one blob of a BatchUpdateBlobsRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Response {
        #[prost(message, optional, tag = "1")]
        pub digest: Option<super::Digest>,
        #[prost(message, optional, tag = "2")]
        pub status: Option<crate::rpc::Status>,
    }
}

/// `build.bazel.remote.execution.v2.BatchReadBlobsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchReadBlobsRequest {
    #[prost(string, tag = "1")]
    pub instance_name: String,
    #[prost(message, repeated, tag = "2")]
    pub digests: Vec<Digest>,
    #[prost(enumeration = "crate::reapi::compressor::Value", repeated, tag = "3")]
    pub acceptable_compressors: Vec<i32>,
    #[prost(enumeration = "crate::reapi::digest_function::Value", tag = "4")]
    pub digest_function: i32,
}

/// `build.bazel.remote.execution.v2.BatchReadBlobsResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchReadBlobsResponse {
    #[prost(message, repeated, tag = "1")]
    pub responses: Vec<batch_read_blobs_response::Response>,
}

pub mod batch_read_blobs_response {
    use bytes::Bytes;

    /// One blob of a BatchReadBlobsResponse.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Response {
        #[prost(message, optional, tag = "1")]
        pub digest: Option<super::Digest>,
        #[prost(bytes = "bytes", tag = "2")]
        pub data: Bytes,
        #[prost(enumeration = "crate::reapi::compressor::Value", tag = "4")]
        pub compressor: i32,
        #[prost(message, optional, tag = "3")]
        pub status: Option<crate::rpc::Status>,
    }
}

/// `google.bytestream.ByteStream` server and client over [`ReadResponse`]
/// and [`WriteRequest`].
pub mod bytestream {
    include!(concat!(env!("OUT_DIR"), "/google.bytestream.ByteStream.rs"));
}

/// `build.bazel.remote.execution.v2.ContentAddressableStorage` server and
/// client; FindMissingBlobs, BatchUpdateBlobs and BatchReadBlobs use the
/// messages of this module.
pub mod cas {
    include!(concat!(
        env!("OUT_DIR"),
        "/build.bazel.remote.execution.v2.ContentAddressableStorage.rs"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bytestream as up_bs, reapi as up};
    use bytes::{BufMut, BytesMut};
    use prost::Message;

    fn hex(n: u8) -> String {
        format!("{:02x}", n).repeat(32)
    }

    /// Whether `part` points into `whole`'s memory.
    fn inside(part: &[u8], whole: &[u8]) -> bool {
        let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
        p >= w && p + part.len() <= w + whole.len()
    }

    #[test]
    fn batch_update_round_trips_with_upstream() {
        let upstream = up::BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: vec![
                up::batch_update_blobs_request::Request {
                    digest: Some(up::Digest {
                        hash: hex(1),
                        size_bytes: 3,
                    }),
                    data: b"abc".to_vec(),
                    compressor: up::compressor::Value::Identity as i32,
                },
                up::batch_update_blobs_request::Request {
                    digest: Some(up::Digest {
                        hash: hex(2),
                        size_bytes: 0,
                    }),
                    data: Vec::new(),
                    compressor: up::compressor::Value::Zstd as i32,
                },
            ],
            digest_function: up::digest_function::Value::Sha256 as i32,
        };
        let wire = Bytes::from(upstream.encode_to_vec());
        let fast = BatchUpdateBlobsRequest::decode(wire.clone()).unwrap();
        assert_eq!(fast.instance_name, "main");
        assert_eq!(fast.requests.len(), 2);
        let first = &fast.requests[0];
        assert_eq!(first.digest.as_ref().unwrap().hash_str(), Some(hex(1).as_str()));
        assert_eq!(&first.data[..], b"abc");
        // Decoded from a `Bytes`, payload and hash are views of the input.
        assert!(inside(&first.data, &wire));
        assert!(inside(&first.digest.as_ref().unwrap().hash, &wire));
        assert_eq!(fast.requests[1].compressor, up::compressor::Value::Zstd as i32);
        // And back: the upstream decoder reads what we encode.
        let back = up::BatchUpdateBlobsRequest::decode(fast.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, upstream);
    }

    #[test]
    fn responses_decode_as_upstream() {
        let resp = BatchReadBlobsResponse {
            responses: vec![batch_read_blobs_response::Response {
                digest: Some(Digest {
                    hash: Bytes::from(hex(7)),
                    size_bytes: 5,
                }),
                data: Bytes::from_static(b"hello"),
                compressor: up::compressor::Value::Identity as i32,
                status: Some(crate::rpc::Status::default()),
            }],
        };
        let up_resp = up::BatchReadBlobsResponse::decode(resp.encode_to_vec().as_slice()).unwrap();
        assert_eq!(up_resp.responses[0].data, b"hello");
        assert_eq!(up_resp.responses[0].digest.as_ref().unwrap().hash, hex(7));

        let find = FindMissingBlobsResponse {
            missing_blob_digests: vec![Digest {
                hash: Bytes::from(hex(9)),
                size_bytes: 1,
            }],
        };
        let up_find = up::FindMissingBlobsResponse::decode(find.encode_to_vec().as_slice()).unwrap();
        assert_eq!(up_find.missing_blob_digests[0].hash, hex(9));

        let upd = BatchUpdateBlobsResponse {
            responses: vec![batch_update_blobs_response::Response {
                digest: Some(Digest::from(up::Digest {
                    hash: hex(3),
                    size_bytes: 2,
                })),
                status: Some(crate::rpc::Status {
                    code: 3,
                    message: "bad".into(),
                    details: Vec::new(),
                }),
            }],
        };
        let up_upd = up::BatchUpdateBlobsResponse::decode(upd.encode_to_vec().as_slice()).unwrap();
        assert_eq!(up_upd.responses[0].status.as_ref().unwrap().code, 3);
        assert_eq!(up_upd.responses[0].digest.as_ref().unwrap().hash, hex(3));
    }

    #[test]
    fn find_missing_and_batch_read_requests_match_upstream() {
        let find = up::FindMissingBlobsRequest {
            instance_name: "x".into(),
            blob_digests: vec![
                up::Digest {
                    hash: hex(4),
                    size_bytes: 10,
                },
                up::Digest {
                    hash: hex(5),
                    size_bytes: 11,
                },
            ],
            digest_function: up::digest_function::Value::Blake3 as i32,
        };
        let fast = FindMissingBlobsRequest::decode(find.encode_to_vec().as_slice()).unwrap();
        assert_eq!(fast.blob_digests.len(), 2);
        assert_eq!(fast.blob_digests[1].hash, hex(5).as_bytes());
        assert_eq!(fast.digest_function, find.digest_function);
        assert_eq!(
            up::FindMissingBlobsRequest::decode(fast.encode_to_vec().as_slice()).unwrap(),
            find
        );

        let read = up::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: find.blob_digests.clone(),
            acceptable_compressors: vec![
                up::compressor::Value::Identity as i32,
                up::compressor::Value::Zstd as i32,
            ],
            digest_function: 0,
        };
        let fast = BatchReadBlobsRequest::decode(read.encode_to_vec().as_slice()).unwrap();
        assert_eq!(fast.acceptable_compressors, read.acceptable_compressors);
        assert_eq!(
            up::BatchReadBlobsRequest::decode(fast.encode_to_vec().as_slice()).unwrap(),
            read
        );
    }

    #[test]
    fn bytestream_messages_match_upstream() {
        let w = up_bs::WriteRequest {
            resource_name: "uploads/u/blobs/abc/3".into(),
            write_offset: 7,
            finish_write: true,
            data: b"xyz".to_vec(),
        };
        // Decoding through a BytesMut (as tonic does) slices, too.
        let mut buf = BytesMut::new();
        buf.put_slice(&w.encode_to_vec());
        let start = buf.as_ptr() as usize;
        let len = buf.len();
        let fast = WriteRequest::decode(&mut buf).unwrap();
        let p = fast.data.as_ptr() as usize;
        assert!(p >= start && p + 3 <= start + len, "data was copied");
        assert_eq!(fast.resource_name, w.resource_name);
        assert_eq!((fast.write_offset, fast.finish_write), (7, true));
        assert_eq!(
            up_bs::WriteRequest::decode(fast.encode_to_vec().as_slice()).unwrap(),
            w
        );

        let r = ReadResponse {
            data: Bytes::from_static(b"data"),
        };
        let wire = Bytes::from(r.encode_to_vec());
        assert_eq!(up_bs::ReadResponse::decode(wire.clone()).unwrap().data, b"data");
        assert!(inside(&ReadResponse::decode(wire.clone()).unwrap().data, &wire));
    }

    #[test]
    fn non_utf8_hash_is_visible() {
        let d = Digest {
            hash: Bytes::from_static(&[0xff, 0xfe]),
            size_bytes: 1,
        };
        assert_eq!(d.hash_str(), None);
    }
}
