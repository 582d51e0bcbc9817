//! ContentAddressableStorage.GetTree over real gRPC: breadth-first walk,
//! de-duplication of repeated subtrees, paging and page tokens.

mod common;

use std::collections::HashSet;

use kiln_digest::{BlobKey, DigestFunction};
use kiln_proto::reapi::batch_update_blobs_request::Request as UpdateReq;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode, FileNode, GetTreeRequest, GetTreeResponse,
};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

type Cas = ContentAddressableStorageClient<Channel>;

fn digest(data: &[u8]) -> Digest {
    BlobKey::of(DigestFunction::Sha256, data).to_digest()
}

fn dir(files: &[&str], dirs: &[(&str, &Directory)]) -> Directory {
    Directory {
        files: files
            .iter()
            .map(|f| FileNode {
                name: f.to_string(),
                digest: Some(digest(f.as_bytes())),
                is_executable: false,
                node_properties: None,
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(name, d)| DirectoryNode {
                name: name.to_string(),
                digest: Some(digest(&d.encode_to_vec())),
            })
            .collect(),
        symlinks: vec![],
        node_properties: None,
    }
}

fn ddigest(d: &Directory) -> Digest {
    digest(&d.encode_to_vec())
}

async fn put(cas: &mut Cas, blobs: Vec<Vec<u8>>) {
    let resp = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "main".into(),
            requests: blobs
                .into_iter()
                .map(|b| UpdateReq {
                    digest: Some(digest(&b)),
                    data: b,
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

/// root -> {a, b}; a -> c; b -> c (a repeated subtree); c -> d.
struct Fixture {
    root: Directory,
    all: Vec<Directory>,
}

async fn fixture(cas: &mut Cas) -> Fixture {
    let d = dir(&["leaf.txt"], &[]);
    let c = dir(&["c.txt"], &[("d", &d)]);
    let a = dir(&["a.txt"], &[("c", &c)]);
    let b = dir(&["b.txt"], &[("c", &c)]);
    let root = dir(&["top.txt"], &[("a", &a), ("b", &b)]);
    let all = vec![root.clone(), a, b, c, d];
    put(cas, all.iter().map(|d| d.encode_to_vec()).collect()).await;
    Fixture { root, all }
}

fn req(root: Digest, page_size: i32, page_token: &str) -> GetTreeRequest {
    GetTreeRequest {
        instance_name: "main".into(),
        root_digest: Some(root),
        page_size,
        page_token: page_token.into(),
        digest_function: 0,
    }
}

async fn collect(cas: &mut Cas, r: GetTreeRequest) -> Result<Vec<GetTreeResponse>, tonic::Status> {
    let mut stream = cas.get_tree(r).await?.into_inner();
    let mut out = Vec::new();
    for _ in 0..1000 {
        match stream.message().await? {
            Some(m) => out.push(m),
            None => return Ok(out),
        }
    }
    panic!("GetTree stream did not end");
}

fn dirs_of(pages: &[GetTreeResponse]) -> Vec<Vec<u8>> {
    pages
        .iter()
        .flat_map(|p| p.directories.iter().map(|d| d.encode_to_vec()))
        .collect()
}

fn set(dirs: &[Vec<u8>]) -> HashSet<Vec<u8>> {
    dirs.iter().cloned().collect()
}

#[tokio::test]
async fn walks_every_directory_once() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let fx = fixture(&mut cas).await;
    let pages = collect(&mut cas, req(ddigest(&fx.root), 0, "")).await.unwrap();
    assert_eq!(pages.len(), 1);
    assert!(pages[0].next_page_token.is_empty());
    let got = dirs_of(&pages);
    assert_eq!(
        got.len(),
        5,
        "the repeated subtree c (and d below it) appears once"
    );
    assert_eq!(
        set(&got),
        set(&dirs_of(&[GetTreeResponse {
            directories: fx.all.clone(),
            next_page_token: String::new(),
        }]))
    );
    // Breadth first: the root comes first, the deepest directory last.
    assert_eq!(got[0], fx.root.encode_to_vec());
    assert_eq!(got[4], fx.all[4].encode_to_vec());
}

#[tokio::test]
async fn small_pages_reassemble_the_same_set() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let fx = fixture(&mut cas).await;
    let want = set(&fx.all.iter().map(|d| d.encode_to_vec()).collect::<Vec<_>>());
    for (page_size, pages_expected) in [(1, 5), (2, 3)] {
        let pages = collect(&mut cas, req(ddigest(&fx.root), page_size, ""))
            .await
            .unwrap();
        assert_eq!(pages.len(), pages_expected, "page_size {page_size}");
        for (i, p) in pages.iter().enumerate() {
            assert!(p.directories.len() <= page_size as usize);
            assert_eq!(
                p.next_page_token.is_empty(),
                i == pages.len() - 1,
                "token only on non-final pages"
            );
        }
        let got = dirs_of(&pages);
        assert_eq!(got.len(), 5);
        assert_eq!(set(&got), want);
    }
}

#[tokio::test]
async fn a_token_resumes_where_the_page_ended() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let fx = fixture(&mut cas).await;
    let want = set(&fx.all.iter().map(|d| d.encode_to_vec()).collect::<Vec<_>>());
    let pages = collect(&mut cas, req(ddigest(&fx.root), 2, "")).await.unwrap();
    let first = dirs_of(&pages[..1]);
    assert_eq!(first.len(), 2);
    let token = pages[0].next_page_token.clone();
    assert!(!token.is_empty());

    let rest = collect(&mut cas, req(ddigest(&fx.root), 0, &token))
        .await
        .unwrap();
    let rest = dirs_of(&rest);
    assert!(
        !rest.contains(&fx.root.encode_to_vec()),
        "the root is not walked again"
    );
    let mut all = first.clone();
    all.extend(rest.iter().cloned());
    assert_eq!(all.len(), 5);
    assert_eq!(set(&all), want);

    // Chaining tokens one page at a time gives the same result.
    let mut token = String::new();
    let mut chained = Vec::new();
    for _ in 0..10 {
        let mut stream = cas
            .get_tree(req(ddigest(&fx.root), 1, &token))
            .await
            .unwrap()
            .into_inner();
        let page = stream.message().await.unwrap().unwrap();
        chained.extend(page.directories.iter().map(|d| d.encode_to_vec()));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(token.is_empty());
    assert_eq!(chained.len(), 5);
    assert_eq!(set(&chained), want);
}

#[tokio::test]
async fn bad_tokens_are_invalid_arguments() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let fx = fixture(&mut cas).await;
    let other = dir(&["other.txt"], &[("x", &fx.all[4])]);
    put(&mut cas, vec![other.encode_to_vec()]).await;
    let pages = collect(&mut cas, req(ddigest(&other), 1, "")).await.unwrap();
    let foreign = pages[0].next_page_token.clone();
    assert!(!foreign.is_empty());

    for token in ["!!!", "AAAA", "c29tZSBnYXJiYWdl", foreign.as_str()] {
        let err = collect(&mut cas, req(ddigest(&fx.root), 0, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "token {token:?}");
    }
    let mut truncated = foreign.clone();
    truncated.truncate(foreign.len() - 4);
    let err = collect(&mut cas, req(ddigest(&other), 0, &truncated))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn root_errors() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let absent = dir(&["never uploaded"], &[]);
    let err = collect(&mut cas, req(ddigest(&absent), 0, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let not_a_dir = vec![0xffu8, 0xff, 0xff];
    put(&mut cas, vec![not_a_dir.clone()]).await;
    let err = collect(&mut cas, req(digest(&not_a_dir), 0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = collect(&mut cas, req(ddigest(&absent), -1, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut r = req(ddigest(&absent), 0, "");
    r.instance_name = "nope".into();
    assert_eq!(
        collect(&mut cas, r).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut r = req(ddigest(&absent), 0, "");
    r.root_digest = None;
    assert_eq!(
        collect(&mut cas, r).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn missing_directories_below_the_root_are_skipped() {
    let server = common::start_memory().await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let present = dir(&["here.txt"], &[]);
    let gone_child = dir(&["deeper.txt"], &[]);
    let gone = dir(&["gone.txt"], &[("deeper", &gone_child)]);
    let root = dir(&[], &[("present", &present), ("gone", &gone)]);
    // `gone` and its child are never uploaded.
    put(&mut cas, vec![present.encode_to_vec(), root.encode_to_vec()]).await;
    let pages = collect(&mut cas, req(ddigest(&root), 0, "")).await.unwrap();
    let got = dirs_of(&pages);
    assert_eq!(got, vec![root.encode_to_vec(), present.encode_to_vec()]);
}
