//! Building BatchUpdateBlobs requests from keys and reading their per-blob
//! statuses: shared by every Kiln CAS client (the CLI and the worker).

use kiln_proto::reapi::{BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, batch_update_blobs_request};
use kiln_proto::rpc;

use crate::BlobKey;

/// An identity-encoded BatchUpdateBlobs request for `blobs`.
pub fn batch_update_request<D: AsRef<[u8]>>(
    instance_name: &str,
    digest_function: i32,
    blobs: &[(BlobKey, D)],
) -> BatchUpdateBlobsRequest {
    BatchUpdateBlobsRequest {
        instance_name: instance_name.to_string(),
        requests: blobs
            .iter()
            .map(|(k, data)| batch_update_blobs_request::Request {
                digest: Some(k.to_digest()),
                data: data.as_ref().to_vec(),
                compressor: 0,
            })
            .collect(),
        digest_function,
    }
}

/// The first blob the server did not store: (`hash/size`, its status).
pub fn first_failed_update(resp: BatchUpdateBlobsResponse) -> Option<(String, rpc::Status)> {
    resp.responses.into_iter().find_map(|r| {
        let status = r.status.filter(|s| s.code != 0)?;
        let what = r
            .digest
            .map(|d| format!("{}/{}", d.hash, d.size_bytes))
            .unwrap_or_default();
        Some((what, status))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DigestFunction;
    use kiln_proto::reapi::batch_update_blobs_response::Response;

    #[test]
    fn request_carries_every_blob_and_failures_are_found() {
        let a = BlobKey::of(DigestFunction::Sha256, b"a");
        let b = BlobKey::of(DigestFunction::Sha256, b"bb");
        let req = batch_update_request(
            "main",
            1,
            &[(a.clone(), b"a".to_vec()), (b.clone(), b"bb".to_vec())],
        );
        assert_eq!(req.instance_name, "main");
        assert_eq!(req.requests.len(), 2);
        assert_eq!(req.requests[1].digest, Some(b.to_digest()));
        assert_eq!(req.requests[1].data, b"bb");

        let ok = |k: &BlobKey, code: i32| Response {
            digest: Some(k.to_digest()),
            status: Some(rpc::Status {
                code,
                message: "m".into(),
                details: vec![],
            }),
        };
        let all_ok = BatchUpdateBlobsResponse {
            responses: vec![ok(&a, 0), ok(&b, 0)],
        };
        assert!(first_failed_update(all_ok).is_none());
        let one_bad = BatchUpdateBlobsResponse {
            responses: vec![ok(&a, 0), ok(&b, 3)],
        };
        let (what, status) = first_failed_update(one_bad).unwrap();
        assert_eq!(what, format!("{}/2", b.hash_hex()));
        assert_eq!(status.code, 3);
    }
}
