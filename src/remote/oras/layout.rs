//! How a podfs version looks in a registry: building the OCI image manifest of a version and
//! recognising one (see `docs/ORAS.md`).
//!
//! Layer 0 is the version zip ([`VERSION_MEDIA_TYPE`]), then every state zip the version refers
//! to ([`STATE_MEDIA_TYPE`]), each titled (`org.opencontainers.image.title`) with its format-v1
//! object name. The config is the OCI empty descriptor and `artifactType` is
//! [`POD_ARTIFACT_TYPE`]. Manifests above [`MAX_MANIFEST_BYTES`] are refused before any push.

use std::collections::BTreeMap;

use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use sha2::{Digest, Sha256};

/// `artifactType` of every podfs version manifest.
pub const POD_ARTIFACT_TYPE: &str = "application/vnd.podfs.pod.v1";
/// Media type of layer 0: the version zip (`localstack-pod-P-version-N.zip`).
pub const VERSION_MEDIA_TYPE: &str = "application/vnd.podfs.version.v1+zip";
/// Media type of the other layers: state zips (`localstack-pod-P-state-K.zip`).
pub const STATE_MEDIA_TYPE: &str = "application/vnd.podfs.state.v1+zip";
/// The OCI empty descriptor used as config.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// The layer annotation holding the object name.
pub const TITLE: &str = "org.opencontainers.image.title";
/// Largest manifest distribution accepts.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Manifest types asked for when pulling (anything else is reported as not a pod).
pub const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` and size of a file, read in 1 MiB pieces.
pub fn file_digest(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

pub fn title_of(layer: &OciDescriptor) -> Option<&str> {
    layer.annotations.as_ref()?.get(TITLE).map(String::as_str)
}

pub fn descriptor(media_type: &str, digest: String, size: u64, title: String) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.to_owned(),
        digest,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: Some(BTreeMap::from([(TITLE.to_owned(), title)])),
        ..Default::default()
    }
}

/// The manifest of a version: `layers[0]` is the version zip, the rest its states.
pub fn build_manifest(layers: Vec<OciDescriptor>) -> OciImageManifest {
    OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        config: OciDescriptor {
            media_type: EMPTY_CONFIG_MEDIA_TYPE.to_owned(),
            digest: EMPTY_CONFIG_DIGEST.to_owned(),
            size: EMPTY_CONFIG.len() as i64,
            ..Default::default()
        },
        layers,
        subject: None,
        artifact_type: Some(POD_ARTIFACT_TYPE.to_owned()),
        annotations: None,
    }
}

/// Serializes a manifest, refusing one the registry would reject for its size.
pub fn encode_manifest(manifest: &OciImageManifest) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(manifest).map_err(|e| e.to_string())?;
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "its manifest would be {} bytes ({} layers), over the 4 MiB limit registries accept \
             for manifests; nothing was committed",
            body.len(),
            manifest.layers.len()
        ));
    }
    Ok(body)
}

/// Parses and validates a podfs version manifest; the error says why it is not one.
pub fn parse_pod_manifest(body: &[u8]) -> Result<OciImageManifest, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        artifact_type: Option<String>,
        config: Option<serde_json::Value>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(body).map_err(|e| format!("unreadable manifest: {e}"))?;
    // `mediaType` is optional in an image manifest; an index has `manifests` instead.
    let media_type = match (probe.media_type, &probe.manifests) {
        (Some(m), _) => m,
        (None, Some(_)) => "application/vnd.oci.image.index.v1+json".to_owned(),
        (None, None) => OCI_IMAGE_MEDIA_TYPE.to_owned(),
    };
    if media_type != OCI_IMAGE_MEDIA_TYPE {
        return Err(format!("manifest type {media_type:?}"));
    }
    let artifact_type = probe.artifact_type.or_else(|| {
        probe
            .config
            .as_ref()
            .and_then(|c| c.get("mediaType"))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    });
    if artifact_type.as_deref() != Some(POD_ARTIFACT_TYPE) {
        return Err(format!(
            "artifactType {:?}, expected {POD_ARTIFACT_TYPE:?}",
            artifact_type.unwrap_or_default()
        ));
    }
    let manifest: OciImageManifest =
        serde_json::from_slice(body).map_err(|e| format!("unreadable manifest: {e}"))?;
    match manifest.layers.first() {
        Some(l) if l.media_type == VERSION_MEDIA_TYPE => Ok(manifest),
        _ => Err(format!("its first layer is not a {VERSION_MEDIA_TYPE}")),
    }
}

/// Whether `s` is a valid repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_repo_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(i: u64) -> OciDescriptor {
        descriptor(
            STATE_MEDIA_TYPE,
            sha256_digest(&i.to_le_bytes()),
            1000,
            format!("localstack-pod-some-pod-state-{i}.zip"),
        )
    }

    #[test]
    fn empty_config_digest_is_right() {
        assert_eq!(sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG_DIGEST);
    }

    #[test]
    fn manifests_round_trip_and_are_recognised() {
        let mut layers = vec![descriptor(
            VERSION_MEDIA_TYPE,
            sha256_digest(b"v"),
            1,
            "localstack-pod-p-version-1.zip".into(),
        )];
        layers.push(layer(1));
        let body = encode_manifest(&build_manifest(layers)).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(
            text.contains("\"artifactType\":\"application/vnd.podfs.pod.v1\""),
            "{text}"
        );
        assert!(text.contains(EMPTY_CONFIG_DIGEST));
        let m = parse_pod_manifest(&body).unwrap();
        assert_eq!(
            title_of(&m.layers[1]),
            Some("localstack-pod-some-pod-state-1.zip")
        );

        let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.unknown.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let err = parse_pod_manifest(other).unwrap_err();
        assert!(
            err.contains("artifactType \"application/vnd.unknown.config.v1+json\""),
            "{err}"
        );
        let err = parse_pod_manifest(b"{\"manifests\":[]}").unwrap_err();
        assert!(err.contains("manifest type"), "{err}");
    }

    #[test]
    fn oversized_manifests_are_refused_before_pushing() {
        // About 250 bytes per layer: 20,000 state layers exceed 4 MiB.
        let layers: Vec<_> = (1..=20_000).map(layer).collect();
        let err = encode_manifest(&build_manifest(layers)).unwrap_err();
        assert!(err.contains("over the 4 MiB limit"), "{err}");
        let layers: Vec<_> = (1..=100).map(layer).collect();
        assert!(encode_manifest(&build_manifest(layers)).is_ok());
    }

    #[test]
    fn repository_components() {
        for ok in ["p", "my-pod", "a--b", "a_b", "a__b", "pod1", "0"] {
            assert!(is_repo_component(ok), "{ok}");
        }
        for bad in ["My-Pod", "-a", "a-", "_a", "a___b", "a_-b", ""] {
            assert!(!is_repo_component(bad), "{bad}");
        }
    }
}
