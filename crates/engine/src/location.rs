//! Where a dataset lives: a local (or shared) file-system directory, or a key prefix in an S3
//! bucket (docs/storage.md).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use object_store::path::Path as StorePath;

use crate::EngineError;

/// The URL scheme of datasets in S3-compatible object stores.
pub const S3_SCHEME: &str = "s3://";

/// The location of a dataset, as given on the command line: a directory path, or
/// `s3://bucket/prefix` (any S3-compatible store, configured by the standard `AWS_*`
/// environment variables; see [`crate::s3`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DatasetLocation {
    /// A directory of the local (or a shared) file system.
    Local(PathBuf),
    /// The objects under `prefix/` in an S3 bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix (without a trailing `/`); never empty.
        prefix: StorePath,
    },
}

impl DatasetLocation {
    /// Parses `s3://bucket/prefix` (a trailing `/` is ignored) or, for anything not starting
    /// with `s3://`, a local path.
    pub fn parse(text: &str) -> Result<Self, EngineError> {
        let Some(rest) = text.strip_prefix(S3_SCHEME) else {
            return Ok(DatasetLocation::Local(PathBuf::from(text)));
        };
        let invalid = |reason: &str| EngineError::InvalidLocation {
            location: text.to_string(),
            reason: reason.to_string(),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        validate_bucket(bucket).map_err(invalid)?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(invalid(
                "give a key prefix for the dataset (s3://bucket/prefix): a dataset is every \
                 object under its prefix, so it cannot be a whole bucket",
            ));
        }
        let prefix = StorePath::parse(prefix)
            .map_err(|e| invalid(&format!("not a valid object key prefix: {e}")))?;
        Ok(DatasetLocation::S3 {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// True for an `s3://` location.
    pub fn is_s3(&self) -> bool {
        matches!(self, DatasetLocation::S3 { .. })
    }

    /// The local path, if this is a local location.
    pub fn as_local(&self) -> Option<&Path> {
        match self {
            DatasetLocation::Local(path) => Some(path),
            DatasetLocation::S3 { .. } => None,
        }
    }

    /// The location as another process sees it: URLs unchanged, a relative path made
    /// absolute (against the current directory).
    pub fn absolute(&self) -> Result<Self, EngineError> {
        match self {
            DatasetLocation::Local(path) => std::path::absolute(path)
                .map(DatasetLocation::Local)
                .map_err(|e| EngineError::io(path, e)),
            s3 => Ok(s3.clone()),
        }
    }

    /// A local path relative to `base` (unless absolute); URLs unchanged.
    pub fn relative_to(self, base: &Path) -> Self {
        match self {
            DatasetLocation::Local(path) if path.is_relative() => {
                DatasetLocation::Local(base.join(path))
            }
            other => other,
        }
    }
}

/// As its text: a path or an `s3://` URL.
impl serde::Serialize for DatasetLocation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DatasetLocation::Local(path) => match path.to_str() {
                Some(text) => serializer.serialize_str(text),
                None => Err(serde::ser::Error::custom(format!(
                    "{}: the path is not UTF-8",
                    path.display()
                ))),
            },
            s3 => serializer.collect_str(s3),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DatasetLocation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        DatasetLocation::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Checks the S3 bucket naming rules that matter here: 3 to 63 characters, lowercase
/// letters, digits, `.` and `-`, starting and ending with a letter or digit.
fn validate_bucket(bucket: &str) -> Result<(), &'static str> {
    let valid_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let edges = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if bucket.is_empty() {
        Err("no bucket name")
    } else if !(3..=63).contains(&bucket.len())
        || !valid_chars
        || !edges(bucket.bytes().next())
        || !edges(bucket.bytes().last())
    {
        Err("not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    } else {
        Ok(())
    }
}

impl fmt::Display for DatasetLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetLocation::Local(path) => write!(f, "{}", path.display()),
            DatasetLocation::S3 { bucket, prefix } => write!(f, "{S3_SCHEME}{bucket}/{prefix}"),
        }
    }
}

impl FromStr for DatasetLocation {
    type Err = EngineError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        DatasetLocation::parse(text)
    }
}

impl From<PathBuf> for DatasetLocation {
    fn from(path: PathBuf) -> Self {
        DatasetLocation::Local(path)
    }
}

impl From<&Path> for DatasetLocation {
    fn from(path: &Path) -> Self {
        DatasetLocation::Local(path.to_path_buf())
    }
}

impl From<&PathBuf> for DatasetLocation {
    fn from(path: &PathBuf) -> Self {
        DatasetLocation::Local(path.clone())
    }
}

impl From<&DatasetLocation> for DatasetLocation {
    fn from(location: &DatasetLocation) -> Self {
        location.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_paths_and_s3_urls() {
        assert_eq!(
            DatasetLocation::parse("data/people.enc").unwrap(),
            DatasetLocation::Local("data/people.enc".into())
        );
        let s3 = DatasetLocation::parse("s3://my-bucket.1/a/b/people.enc/").unwrap();
        assert_eq!(
            s3,
            DatasetLocation::S3 {
                bucket: "my-bucket.1".into(),
                prefix: StorePath::from("a/b/people.enc"),
            }
        );
        assert_eq!(s3.to_string(), "s3://my-bucket.1/a/b/people.enc");
    }

    #[test]
    fn rejects_bad_s3_urls_naming_them() {
        for (url, why) in [
            ("s3://", "no bucket name"),
            ("s3://bucket", "give a key prefix"),
            ("s3://bucket/", "give a key prefix"),
            ("s3://Bucket/x", "not a valid S3 bucket name"),
            ("s3://ab/x", "not a valid S3 bucket name"),
            ("s3://-ab/x", "not a valid S3 bucket name"),
            ("s3://bucket/a//b", "not a valid object key prefix"),
            ("s3://bucket/a/../b", "not a valid object key prefix"),
        ] {
            let err = DatasetLocation::parse(url).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{url}: ")), "{err}");
            assert!(err.contains(why), "{url}: {err}");
        }
    }
}
