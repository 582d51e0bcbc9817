//! Parsing `{instance}/{function}/{hash}/{size}` from URLs. The instance
//! segment `_` names the default instance "" (unless the server has an
//! instance literally called "_" and no "" one); other names are
//! percent-encoded (`a%2Fb` for "a/b").

use std::sync::Arc;

use kiln_cache::{Instance, Instances};
use kiln_digest::{BlobKey, DigestFunction};

use crate::error::{DashboardError, DashboardResult};

/// The URL segment for an instance name.
pub fn instance_segment(name: &str) -> &str {
    if name.is_empty() { "_" } else { name }
}

/// The instance a URL segment names.
pub fn instance<'a>(instances: &'a Instances, segment: &str) -> DashboardResult<&'a Arc<Instance>> {
    let name = if segment == "_" && instances.get("_").is_err() {
        ""
    } else {
        segment
    };
    instances
        .get(name)
        .map_err(|e| DashboardError::BadRequest(e.to_string()))
}

/// Parses a digest function name (`sha256`, `blake3`, ...).
pub fn function(name: &str) -> DashboardResult<DigestFunction> {
    DigestFunction::from_name(&name.to_ascii_lowercase()).ok_or_else(|| {
        let known: Vec<&str> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
        DashboardError::BadRequest(format!(
            "unknown digest function {name:?}; expected one of {}",
            known.join(", ")
        ))
    })
}

/// Parses and validates a whole blob reference on one instance.
pub fn blob(
    instances: &Instances,
    instance_seg: &str,
    function_name: &str,
    hash: &str,
    size: &str,
) -> DashboardResult<(Arc<Instance>, BlobKey)> {
    let inst = instance(instances, instance_seg)?;
    let f = function(function_name)?;
    inst.check_function(f)
        .map_err(|e| DashboardError::BadRequest(e.to_string()))?;
    let size: i64 = size.parse().map_err(|_| {
        DashboardError::BadRequest(format!("digest size {size:?} is not a non-negative integer"))
    })?;
    let key = BlobKey::from_hex(f, hash, size)
        .map_err(|e| DashboardError::BadRequest(format!("bad digest: {e}")))?;
    Ok((inst.clone(), key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_cache::CacheLimits;
    use kiln_store::Store;
    use kiln_store::memory::MemoryStore;

    fn instances(names: &[&str]) -> Instances {
        let s: Arc<dyn Store> = Arc::new(MemoryStore::new(1 << 20));
        Instances::new(
            names.iter().map(|n| Instance::new(*n, s.clone(), s.clone())),
            CacheLimits::default(),
        )
    }

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_rejects() {
        let i = instances(&["", "main"]);
        let (inst, key) = blob(&i, "_", "sha256", H, "0").unwrap();
        assert_eq!(inst.name, "");
        assert_eq!(key.hash_hex(), H);
        assert_eq!(blob(&i, "main", "SHA256", H, "0").unwrap().0.name, "main");
        for (inst, f, h, s) in [
            ("nope", "sha256", H, "0"),
            ("_", "sha999", H, "0"),
            ("_", "sha256", "abc", "0"),
            ("_", "sha256", H, "-1"),
            ("_", "sha256", H, "ten"),
            ("_", "md5", H, "0"),
        ] {
            let Err(e) = blob(&i, inst, f, h, s) else {
                panic!("{inst} {f} {h} {s} was accepted");
            };
            assert!(
                matches!(e, DashboardError::BadRequest(_)),
                "{inst} {f} {h} {s}: {e}"
            );
        }
        // An instance literally called "_" wins when there is no "".
        let only = instances(&["_"]);
        assert_eq!(blob(&only, "_", "sha256", H, "0").unwrap().0.name, "_");
    }
}
