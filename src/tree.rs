//! Trees: the metadata blobs that describe a snapshot's files, directories and streams.
//!
//! A tree is the JSON listing of one directory. A file node lists its content blobs inline, or,
//! past [`INLINE_CONTENT`] blobs, the ids of *content list* blobs that hold the ids (32 raw
//! bytes each, up to [`LIST_LEN`] per list), so a file of any size needs bounded memory to
//! write or read. A stream backed up from stdin is a tree with one file node.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::id::BlobId;

/// Content ids kept inside the file node; more go to content list blobs.
pub const INLINE_CONTENT: usize = 4096;
/// Content ids per content list blob.
pub const LIST_LEN: usize = 8192;

/// A file name or symlink target: bytes on Unix, shown as text when they are UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameBytes(pub Vec<u8>);

impl NameBytes {
    pub fn to_display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum NameRepr {
    Text(String),
    Raw {
        #[serde(with = "hex::serde")]
        hex: Vec<u8>,
    },
}

impl Serialize for NameBytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(t) => NameRepr::Text(t.to_string()),
            Err(_) => NameRepr::Raw {
                hex: self.0.clone(),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for NameBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<NameBytes, D::Error> {
        Ok(NameBytes(match NameRepr::deserialize(d)? {
            NameRepr::Text(t) => t.into_bytes(),
            NameRepr::Raw { hex } => hex,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    File,
    Dir,
    Symlink,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: NameBytes,
    #[serde(rename = "type")]
    pub node_type: NodeType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex32")]
    pub sha256: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<BlobId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_lists: Vec<BlobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BlobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NameBytes>,
}

mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Some(out))
    }
}

/// A directory listing, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("trees serialize")
    }

    pub fn decode(object: &str, bytes: &[u8]) -> Result<Tree> {
        let tree: Tree = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(object, format!("tree does not parse: {e}")))?;
        for pair in tree.nodes.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(Error::corrupt(
                    object,
                    "tree entries are not sorted and unique",
                ));
            }
        }
        for n in &tree.nodes {
            let name = &n.name.0;
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(Error::corrupt(
                    object,
                    format!("unsafe file name {:?} in tree", n.name.to_display()),
                ));
            }
            let ok = match n.node_type {
                NodeType::File => n.size.is_some() && n.subtree.is_none() && n.target.is_none(),
                NodeType::Dir => n.subtree.is_some(),
                NodeType::Symlink => n.target.is_some(),
            };
            if !ok {
                return Err(Error::corrupt(
                    object,
                    format!("node {:?} lacks its fields", n.name.to_display()),
                ));
            }
        }
        Ok(tree)
    }
}

/// Encodes a content list blob.
pub fn encode_list(ids: &[BlobId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

pub fn decode_list(object: &str, bytes: &[u8]) -> Result<Vec<BlobId>> {
    if bytes.len() % 32 != 0 || bytes.len() > LIST_LEN * 32 {
        return Err(Error::corrupt(object, "content list has a bad length"));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| BlobId::from_slice(c).expect("32"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &[u8]) -> Node {
        Node {
            name: NameBytes(name.to_vec()),
            node_type: NodeType::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_123_456_789,
            size: Some(3),
            sha256: Some([7; 32]),
            content: vec![BlobId([1; 32])],
            content_lists: vec![],
            subtree: None,
            target: None,
        }
    }

    #[test]
    fn tree_round_trip_with_non_utf8_names() {
        let tree = Tree {
            nodes: vec![
                file(b"caf\xe9 \xff.bin"),
                file("emoji 🎉".as_bytes()),
                file(b"plain.txt"),
            ],
        };
        let bytes = tree.encode();
        assert_eq!(Tree::decode("t", &bytes).unwrap(), tree);
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [&b".."[..], b"a/b", b"", b"."] {
            let tree = Tree {
                nodes: vec![file(bad)],
            };
            assert!(Tree::decode("t", &tree.encode()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let tree = Tree {
            nodes: vec![file(b"a"), file(b"a")],
        };
        assert!(Tree::decode("t", &tree.encode()).is_err());
    }

    #[test]
    fn lists_round_trip() {
        let ids = vec![BlobId([1; 32]), BlobId([2; 32])];
        assert_eq!(decode_list("l", &encode_list(&ids)).unwrap(), ids);
        assert!(decode_list("l", &[0; 33]).is_err());
    }
}
