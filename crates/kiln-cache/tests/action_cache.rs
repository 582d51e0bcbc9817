//! ActionCache over real gRPC: hits and misses, validation, read-only
//! instances, inlining, completeness checking and storage faults.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use kiln_cache::{CacheLimits, Instance, Instances};
use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateReq;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode, FileNode,
    GetActionResultRequest, OutputDirectory, OutputFile, OutputSymlink, Tree, UpdateActionResultRequest,
};
use kiln_store::memory::MemoryStore;
use kiln_store::{Blob, BlobRead, BlobWriter, Encoding, Store, StoreError, StoreResult, StoreStats};
use parking_lot::Mutex;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

type Ac = ActionCacheClient<Channel>;
type Cas = ContentAddressableStorageClient<Channel>;

/// A memory store that can hide keys (as if evicted) or fail every call.
struct TestStore {
    inner: MemoryStore,
    fail: AtomicBool,
    hidden: Mutex<HashSet<BlobKey>>,
}

impl TestStore {
    fn new() -> Arc<Self> {
        Arc::new(TestStore {
            inner: MemoryStore::new(64 << 20),
            fail: AtomicBool::new(false),
            hidden: Mutex::new(HashSet::new()),
        })
    }

    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::io(
                "test store",
                std::io::Error::other("injected disk failure"),
            ));
        }
        Ok(())
    }

    fn hidden(&self, key: &BlobKey) -> bool {
        self.hidden.lock().contains(key)
    }
}

#[tonic::async_trait]
impl Store for TestStore {
    fn describe(&self) -> String {
        "test".into()
    }

    async fn has_many(&self, keys: &[BlobKey]) -> StoreResult<Vec<bool>> {
        self.check()?;
        let mut found = self.inner.has_many(keys).await?;
        for (k, f) in keys.iter().zip(found.iter_mut()) {
            *f = *f && !self.hidden(k);
        }
        Ok(found)
    }

    async fn get(&self, key: &BlobKey) -> StoreResult<Option<Blob>> {
        self.check()?;
        if self.hidden(key) {
            return Ok(None);
        }
        self.inner.get(key).await
    }

    async fn read(&self, key: &BlobKey, offset: u64) -> StoreResult<Option<BlobRead>> {
        self.check()?;
        if self.hidden(key) {
            return Ok(None);
        }
        self.inner.read(key, offset).await
    }

    async fn put(&self, key: &BlobKey, blob: Blob) -> StoreResult<()> {
        self.check()?;
        self.inner.put(key, blob).await
    }

    async fn begin_write(&self, key: &BlobKey, encoding: Encoding) -> StoreResult<Box<dyn BlobWriter>> {
        self.check()?;
        self.inner.begin_write(key, encoding).await
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
}

fn key(data: &[u8]) -> BlobKey {
    BlobKey::of(DigestFunction::Sha256, data)
}

fn digest(data: &[u8]) -> Digest {
    key(data).to_digest()
}

fn action(name: &str) -> Digest {
    digest(format!("action {name}").as_bytes())
}

async fn cas_put(cas: &mut Cas, blobs: &[&[u8]]) {
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: blobs
                .iter()
                .map(|b| UpdateReq {
                    digest: Some(digest(b)),
                    data: b.to_vec(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.responses
            .iter()
            .all(|r| r.status.as_ref().unwrap().code == 0)
    );
}

fn get_req(instance: &str, action: Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action),
        inline_stdout: false,
        inline_stderr: false,
        inline_output_files: vec![],
        digest_function: 0,
    }
}

async fn get(ac: &mut Ac, instance: &str, action: Digest) -> Result<ActionResult, tonic::Status> {
    ac.get_action_result(get_req(instance, action))
        .await
        .map(|r| r.into_inner())
}

async fn update(
    ac: &mut Ac,
    instance: &str,
    action: Digest,
    result: ActionResult,
) -> Result<ActionResult, tonic::Status> {
    ac.update_action_result(UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action),
        action_result: Some(result),
        results_cache_policy: None,
        digest_function: 0,
    })
    .await
    .map(|r| r.into_inner())
}

fn out_file(path: &str, data: &[u8]) -> OutputFile {
    OutputFile {
        path: path.into(),
        digest: Some(digest(data)),
        is_executable: false,
        contents: vec![],
        node_properties: None,
    }
}

fn file_node(name: &str, data: &[u8]) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(digest(data)),
        is_executable: false,
        node_properties: None,
    }
}

fn result_with(files: Vec<OutputFile>, dirs: Vec<OutputDirectory>) -> ActionResult {
    ActionResult {
        output_files: files,
        output_directories: dirs,
        exit_code: 0,
        ..Default::default()
    }
}

/// A Tree whose root holds `top` and a child directory holding `nested`.
fn tree(top: &[u8], nested: &[u8]) -> (Tree, Directory) {
    let child = Directory {
        files: vec![file_node("nested.txt", nested)],
        ..Default::default()
    };
    let root = Directory {
        files: vec![file_node("top.txt", top)],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(digest(&child.encode_to_vec())),
        }],
        ..Default::default()
    };
    (
        Tree {
            root: Some(root),
            children: vec![child.clone()],
        },
        child,
    )
}

fn out_dir_tree(path: &str, t: &Tree) -> OutputDirectory {
    OutputDirectory {
        path: path.into(),
        tree_digest: Some(digest(&t.encode_to_vec())),
        is_topologically_sorted: false,
        root_directory_digest: None,
    }
}

#[tokio::test]
async fn a_miss_is_not_found() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let err = get(&mut ac, "main", action("never")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn update_then_get_returns_the_stored_result() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let (t, _) = tree(b"top", b"nested");
    cas_put(&mut cas, &[b"out", b"top", b"nested", b"log", &t.encode_to_vec()]).await;
    let mut result = result_with(vec![out_file("bin/out", b"out")], vec![out_dir_tree("gen", &t)]);
    result.exit_code = 3;
    result.stdout_digest = Some(digest(b"log"));
    result.output_symlinks = vec![OutputSymlink {
        path: "link".into(),
        target: "/abs/target".into(),
        node_properties: None,
    }];
    let stored = update(&mut ac, "main", action("a"), result.clone())
        .await
        .unwrap();
    assert_eq!(stored, result);
    assert_eq!(get(&mut ac, "main", action("a")).await.unwrap(), result);
    // Update replaces.
    result.exit_code = 0;
    update(&mut ac, "main", action("a"), result.clone())
        .await
        .unwrap();
    assert_eq!(get(&mut ac, "main", action("a")).await.unwrap().exit_code, 0);
}

#[tokio::test]
async fn the_digest_function_is_part_of_the_key() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let blake = BlobKey::of(DigestFunction::Blake3, b"action").to_digest();
    let blake_fn = DigestFunction::Blake3.to_proto() as i32;
    ac.update_action_result(UpdateActionResultRequest {
        instance_name: "main".into(),
        action_digest: Some(blake.clone()),
        action_result: Some(ActionResult {
            exit_code: 7,
            ..Default::default()
        }),
        results_cache_policy: None,
        digest_function: blake_fn,
    })
    .await
    .unwrap();
    let mut req = get_req("main", blake.clone());
    req.digest_function = blake_fn;
    assert_eq!(ac.get_action_result(req).await.unwrap().into_inner().exit_code, 7);
    // Same hex, inferred as SHA-256: a different entry.
    assert_eq!(
        get(&mut ac, "main", blake).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn read_only_instances_deny_updates_but_serve_reads() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let result = ActionResult {
        exit_code: 1,
        ..Default::default()
    };
    let err = update(&mut ac, "ro", action("ro"), result.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        get(&mut ac, "ro", action("ro")).await.unwrap_err().code(),
        Code::NotFound
    );
    // "ro" shares its stores with "main" in the harness.
    update(&mut ac, "main", action("ro"), result.clone())
        .await
        .unwrap();
    assert_eq!(get(&mut ac, "ro", action("ro")).await.unwrap(), result);
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let bad = Digest {
        hash: "not hex".into(),
        size_bytes: 5,
    };
    assert_eq!(
        get(&mut ac, "main", bad.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut req = get_req("main", action("x"));
    req.action_digest = None;
    assert_eq!(
        ac.get_action_result(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get(&mut ac, "nope", action("x")).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let ok = ActionResult::default();
    assert_eq!(
        update(&mut ac, "main", bad, ok.clone()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        update(&mut ac, "nope", action("x"), ok.clone())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let cases = [
        // Malformed digest of an output file.
        result_with(
            vec![OutputFile {
                digest: Some(Digest {
                    hash: "ab".into(),
                    size_bytes: 1,
                }),
                ..out_file("f", b"f")
            }],
            vec![],
        ),
        // Empty and absolute paths.
        result_with(vec![out_file("", b"f")], vec![]),
        result_with(vec![out_file("/etc/passwd", b"f")], vec![]),
        // Output file without a digest or contents.
        result_with(
            vec![OutputFile {
                digest: None,
                ..out_file("f", b"f")
            }],
            vec![],
        ),
        // Output directory without any digest.
        result_with(
            vec![],
            vec![OutputDirectory {
                path: "d".into(),
                ..Default::default()
            }],
        ),
        // Inline data that does not match its digest.
        ActionResult {
            stdout_digest: Some(digest(b"expected")),
            stdout_raw: b"something else".to_vec(),
            ..Default::default()
        },
        // Negative size in stderr digest.
        ActionResult {
            stderr_digest: Some(Digest {
                hash: digest(b"e").hash,
                size_bytes: -1,
            }),
            ..Default::default()
        },
    ];
    for (i, r) in cases.into_iter().enumerate() {
        let err = update(&mut ac, "main", action("x"), r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {}", err.message());
    }
    assert_eq!(
        get(&mut ac, "main", action("x")).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn inline_outputs_are_stored_in_the_cas_and_inlined_on_request() {
    let limits = CacheLimits {
        max_inline_bytes: 64,
        ..CacheLimits::default()
    };
    let server = common::start(common::memory_instances(limits)).await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let big = vec![b'x'; 100];
    let uploaded = ActionResult {
        stdout_raw: b"hello stdout".to_vec(),
        stderr_raw: big.clone(),
        output_files: vec![
            OutputFile {
                digest: None,
                contents: b"file one".to_vec(),
                ..out_file("one", b"")
            },
            OutputFile {
                digest: Some(digest(b"file two")),
                contents: b"file two".to_vec(),
                ..out_file("two", b"")
            },
        ],
        ..Default::default()
    };
    let stored = update(&mut ac, "main", action("inline"), uploaded).await.unwrap();
    assert_eq!(stored.stdout_digest, Some(digest(b"hello stdout")));
    assert_eq!(stored.stderr_digest, Some(digest(&big)));
    assert_eq!(stored.output_files[0].digest, Some(digest(b"file one")));
    assert_eq!(stored.output_files[1].digest, Some(digest(b"file two")));
    assert!(stored.stdout_raw.is_empty() && stored.stderr_raw.is_empty());
    assert!(stored.output_files.iter().all(|f| f.contents.is_empty()));

    // Not requested: nothing inline. (The completeness check passing also
    // proves the inline data reached the CAS.)
    let plain = get(&mut ac, "main", action("inline")).await.unwrap();
    assert_eq!(plain, stored);

    let mut req = get_req("main", action("inline"));
    req.inline_stdout = true;
    req.inline_stderr = true;
    req.inline_output_files = vec!["two".into(), "no/such/file".into()];
    let got = ac.get_action_result(req).await.unwrap().into_inner();
    assert_eq!(got.stdout_raw, b"hello stdout");
    assert!(got.stderr_raw.is_empty(), "stderr exceeds max_inline_bytes");
    assert_eq!(got.stderr_digest, Some(digest(&big)));
    assert!(got.output_files[0].contents.is_empty(), "not requested");
    assert_eq!(got.output_files[1].contents, b"file two");
    assert_eq!(got.output_files[1].digest, Some(digest(b"file two")));
}

#[tokio::test]
async fn a_missing_output_file_makes_a_miss() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let result = ActionResult {
        stderr_digest: Some(digest(b"err")),
        ..result_with(vec![out_file("a", b"aaa"), out_file("b", b"bbb")], vec![])
    };
    update(&mut ac, "main", action("files"), result.clone())
        .await
        .unwrap();
    cas_put(&mut cas, &[b"aaa", b"err"]).await;
    assert_eq!(
        get(&mut ac, "main", action("files")).await.unwrap_err().code(),
        Code::NotFound
    );
    cas_put(&mut cas, &[b"bbb"]).await;
    assert_eq!(get(&mut ac, "main", action("files")).await.unwrap(), result);
}

#[tokio::test]
async fn a_missing_stdout_makes_a_miss() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let result = ActionResult {
        stdout_digest: Some(digest(b"out log")),
        ..Default::default()
    };
    update(&mut ac, "main", action("stdout"), result.clone())
        .await
        .unwrap();
    assert_eq!(
        get(&mut ac, "main", action("stdout")).await.unwrap_err().code(),
        Code::NotFound
    );
    cas_put(&mut cas, &[b"out log"]).await;
    assert_eq!(get(&mut ac, "main", action("stdout")).await.unwrap(), result);
}

#[tokio::test]
async fn a_missing_file_inside_an_output_tree_makes_a_miss() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let (t, _) = tree(b"top file", b"nested file");
    let result = result_with(vec![], vec![out_dir_tree("out/dir", &t)]);
    update(&mut ac, "main", action("tree"), result.clone())
        .await
        .unwrap();
    // Tree blob missing.
    cas_put(&mut cas, &[b"top file", b"nested file"]).await;
    assert_eq!(
        get(&mut ac, "main", action("tree")).await.unwrap_err().code(),
        Code::NotFound
    );

    let (t2, _) = tree(b"top file", b"other nested file");
    let result2 = result_with(vec![], vec![out_dir_tree("out/dir", &t2)]);
    update(&mut ac, "main", action("tree2"), result2.clone())
        .await
        .unwrap();
    cas_put(&mut cas, &[&t.encode_to_vec(), &t2.encode_to_vec()]).await;
    assert_eq!(get(&mut ac, "main", action("tree")).await.unwrap(), result);
    // The nested file of t2 (in a child directory of the Tree) is missing.
    assert_eq!(
        get(&mut ac, "main", action("tree2")).await.unwrap_err().code(),
        Code::NotFound
    );
    cas_put(&mut cas, &[b"other nested file"]).await;
    assert_eq!(get(&mut ac, "main", action("tree2")).await.unwrap(), result2);
}

#[tokio::test]
async fn a_root_directory_only_output_is_walked() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let (t, child) = tree(b"dir top", b"dir nested");
    let root = t.root.clone().unwrap();
    let result = result_with(
        vec![],
        vec![OutputDirectory {
            path: "".into(),
            tree_digest: None,
            is_topologically_sorted: false,
            root_directory_digest: Some(digest(&root.encode_to_vec())),
        }],
    );
    update(&mut ac, "main", action("rootdir"), result.clone())
        .await
        .unwrap();
    cas_put(&mut cas, &[&root.encode_to_vec(), b"dir top", b"dir nested"]).await;
    // The child Directory is missing.
    assert_eq!(
        get(&mut ac, "main", action("rootdir")).await.unwrap_err().code(),
        Code::NotFound
    );
    cas_put(&mut cas, &[&child.encode_to_vec()]).await;
    assert_eq!(get(&mut ac, "main", action("rootdir")).await.unwrap(), result);
}

/// Tree expansions are cached, existence never is: a blob that disappears
/// after a hit turns the next lookup into a miss.
#[tokio::test]
async fn evicted_blobs_are_noticed_after_a_cached_hit() {
    let cas_store = TestStore::new();
    let ac_store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let instances = Instances::new(
        [Instance::new("main", cas_store.clone(), ac_store)],
        CacheLimits::default(),
    );
    let server = common::start(instances).await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let (t, _) = tree(b"evictable top", b"evictable nested");
    let tree_bytes = t.encode_to_vec();
    cas_put(&mut cas, &[&tree_bytes, b"evictable top", b"evictable nested"]).await;
    let result = result_with(vec![], vec![out_dir_tree("d", &t)]);
    update(&mut ac, "main", action("evict"), result.clone())
        .await
        .unwrap();
    assert_eq!(get(&mut ac, "main", action("evict")).await.unwrap(), result);

    for gone in [key(b"evictable nested"), key(&tree_bytes)] {
        cas_store.hidden.lock().insert(gone.clone());
        let err = get(&mut ac, "main", action("evict")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{gone} hidden");
        cas_store.hidden.lock().remove(&gone);
        assert_eq!(get(&mut ac, "main", action("evict")).await.unwrap(), result);
    }
}

#[tokio::test]
async fn storage_faults_are_internal() {
    let ac_store = TestStore::new();
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let instances = Instances::new(
        [Instance::new("main", cas, ac_store.clone())],
        CacheLimits::default(),
    );
    let server = common::start(instances).await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let result = ActionResult {
        exit_code: 2,
        ..Default::default()
    };
    update(&mut ac, "main", action("fault"), result.clone())
        .await
        .unwrap();
    ac_store.fail.store(true, Ordering::SeqCst);
    assert_eq!(
        get(&mut ac, "main", action("fault")).await.unwrap_err().code(),
        Code::Internal
    );
    assert_eq!(
        update(&mut ac, "main", action("fault"), result.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Internal
    );
    ac_store.fail.store(false, Ordering::SeqCst);
    assert_eq!(get(&mut ac, "main", action("fault")).await.unwrap(), result);
}

#[tokio::test]
async fn an_undecodable_entry_is_a_miss() {
    let server = common::start_memory().await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let instance = server.instances.get("main").unwrap();
    let k = key(b"action garbage");
    instance
        .ac
        .put(&k, Blob::identity(Bytes::from_static(&[0xff, 0xff, 0xff])))
        .await
        .unwrap();
    assert_eq!(
        get(&mut ac, "main", k.to_digest()).await.unwrap_err().code(),
        Code::NotFound
    );

    // A zstd-encoded entry (e.g. from a compressing store) decodes.
    let good = ActionResult {
        exit_code: 9,
        ..Default::default()
    };
    let z = zstd::bulk::compress(&good.encode_to_vec(), 1).unwrap();
    let k2 = key(b"action zstd");
    instance
        .ac
        .put(
            &k2,
            Blob {
                encoding: Encoding::Zstd,
                data: Bytes::from(z),
            },
        )
        .await
        .unwrap();
    assert_eq!(get(&mut ac, "main", k2.to_digest()).await.unwrap(), good);
}

#[tokio::test]
async fn completeness_checking_can_be_disabled() {
    let cas: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let ac_store: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
    let mut lax = Instance::new("lax", cas.clone(), ac_store.clone());
    lax.ac_completeness_check = false;
    let strict = Instance::new("strict", cas, ac_store);
    let server = common::start(Instances::new([lax, strict], CacheLimits::default())).await;
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let result = result_with(vec![out_file("missing", b"not in the cas")], vec![]);
    update(&mut ac, "lax", action("lax"), result.clone())
        .await
        .unwrap();
    assert_eq!(get(&mut ac, "lax", action("lax")).await.unwrap(), result);
    assert_eq!(
        get(&mut ac, "strict", action("lax")).await.unwrap_err().code(),
        Code::NotFound
    );
}
