//! Names: pod names and `POD[:N]` references, validated once. Below both `remote/` and `pod/`,
//! so the layers stack (config, name, remote, pod, ...).

use std::fmt;
use std::str::FromStr;

/// A pod name: `^[A-Za-z0-9_-]+$`, at most 128 characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName(String);

/// Shown as the quoted name (`"my-pod"`), as messages quote names.
impl fmt::Debug for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PodName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::InvalidName(name.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `POD` or `POD:N` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub pod: PodName,
    pub version: Option<u64>,
}

impl FromStr for PodRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s.split_once(':') {
            None => Ok(Self {
                pod: PodName::new(s)?,
                version: None,
            }),
            Some((pod, v)) => {
                let pod = PodName::new(pod)?;
                let version = v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0 && !v.starts_with('+'))
                    .ok_or_else(|| NameError::InvalidVersion(v.to_owned()))?;
                Ok(Self {
                    pod,
                    version: Some(version),
                })
            }
        }
    }
}

/// A name or reference that does not follow the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid pod name {0:?}: use letters, digits, '-' and '_' (at most 128 characters)")]
    InvalidName(String),
    #[error("invalid version {0:?}: versions are whole numbers from 1 (POD:N)")]
    InvalidVersion(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_refs() {
        let r: PodRef = "my-pod:3".parse().unwrap();
        assert_eq!(r.pod.as_str(), "my-pod");
        assert_eq!(r.version, Some(3));
        assert_eq!("a-state-1".parse::<PodRef>().unwrap().version, None);
        for bad in [
            "p:0", "p:", "p:x", "p:-1", "p:+1", ":1", "a b", "a/b", "a.b", "",
        ] {
            assert!(bad.parse::<PodRef>().is_err(), "{bad}");
        }
    }
}
