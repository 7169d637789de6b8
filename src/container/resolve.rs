//! Resolving a path inside a container root without ever leaving it.
//!
//! A bind destination such as `/var/run/x` may pass through symlinks of the image
//! (`/var/run -> /run`). Those are followed *inside* the container root, the way the kernel
//! follows them once the root is entered; a symlink whose target climbs above the root
//! (`../../etc`) is an error instead of silently landing somewhere else. The walk itself is pure:
//! it asks a [`Lookup`] what each path is, so it is unit-tested against an in-memory tree.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// What a path inside the root is, without following a final symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Nothing there.
    Missing,
    /// A directory.
    Dir,
    /// Anything else that is not a directory or symlink (file, device, socket…).
    File,
    /// A symlink and its target as stored.
    Symlink(PathBuf),
}

/// Answers "what is at this absolute container path" for [`resolve_in_root`].
pub trait Lookup {
    /// What `path` (absolute, inside the root, free of `.`/`..` and of symlinks in every
    /// component but the last) is.
    fn node(&self, path: &Path) -> std::io::Result<Node>;
}

/// Where a container path leads once its symlinks are followed inside the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The symlink-free absolute container path.
    pub path: PathBuf,
    /// What is there now ([`Node::Missing`] if the path, or a parent of it, does not exist yet).
    pub node: Node,
    /// The longest prefix of `path` that exists.
    pub existing: PathBuf,
}

/// Why a container path could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The path is not absolute.
    #[error("{path}: a container path must be absolute")]
    NotAbsolute {
        /// The path given.
        path: PathBuf,
    },
    /// `..` in the path itself would climb above the container root.
    #[error("{path}: climbs above the container root with '..'")]
    ClimbsAboveRoot {
        /// The path given.
        path: PathBuf,
    },
    /// A symlink of the image points outside the container root.
    #[error("{path}: the image symlink {link} -> {target} points outside the container root")]
    SymlinkEscapes {
        /// The path being resolved.
        path: PathBuf,
        /// The symlink met on the way.
        link: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// Too many symlinks (a loop).
    #[error("{path}: too many levels of symlinks inside the container root")]
    Loop {
        /// The path being resolved.
        path: PathBuf,
    },
    /// A component that must be a directory is a file.
    #[error("{path}: {at} is not a directory inside the container root")]
    NotADirectory {
        /// The path being resolved.
        path: PathBuf,
        /// The offending component.
        at: PathBuf,
    },
    /// The lookup itself failed.
    #[error("{path}: cannot inspect {at}: {message}")]
    Io {
        /// The path being resolved.
        path: PathBuf,
        /// The path that could not be inspected.
        at: PathBuf,
        /// The system error.
        message: String,
    },
}

/// Same limit as the kernel's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

/// Normalises an absolute container path lexically (`.` removed, `..` applied), refusing to climb
/// above `/`.
pub fn normalize(path: &Path) -> Result<PathBuf, ResolveError> {
    if !path.is_absolute() {
        return Err(ResolveError::NotAbsolute {
            path: path.to_owned(),
        });
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(ResolveError::ClimbsAboveRoot {
                        path: path.to_owned(),
                    });
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// Follows `path` inside the container root described by `lookup`.
///
/// Absolute symlink targets are taken relative to the container root; a target that climbs above
/// the root with `..` is [`ResolveError::SymlinkEscapes`]. The final component is followed too, so
/// a bind onto a symlink lands on what it points to (as `mount(2)` would).
pub fn resolve_in_root(lookup: &dyn Lookup, path: &Path) -> Result<Resolved, ResolveError> {
    let start = normalize(path)?;
    // Components still to walk, in reverse so that pushing a symlink's target is cheap.
    let mut todo: Vec<OsString> = start
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::from("/");
    let mut links = 0usize;
    // Set while walking a symlink target: `..` there must not climb above the root.
    let mut via_link: Option<(PathBuf, PathBuf)> = None;
    while let Some(name) = todo.pop() {
        if name == "." {
            continue;
        }
        if name == ".." {
            if !cur.pop() {
                let (link, target) = via_link.clone().unwrap_or_default();
                return Err(ResolveError::SymlinkEscapes {
                    path: start,
                    link,
                    target,
                });
            }
            continue;
        }
        let candidate = cur.join(&name);
        let node = lookup.node(&candidate).map_err(|e| ResolveError::Io {
            path: start.clone(),
            at: candidate.clone(),
            message: e.to_string(),
        })?;
        match node {
            Node::Symlink(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ResolveError::Loop { path: start });
                }
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_owned()),
                        Component::ParentDir => todo.push("..".into()),
                        Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                    }
                }
                via_link = Some((candidate, target));
            }
            Node::Missing => {
                let existing = cur.clone();
                let mut full = candidate;
                // The rest cannot exist; `..` in it is applied lexically but may not climb out of
                // the part that does exist.
                while let Some(rest) = todo.pop() {
                    if rest == ".." {
                        if !full.pop() || !full.starts_with(&existing) {
                            return Err(ResolveError::ClimbsAboveRoot { path: start });
                        }
                    } else if rest != "." {
                        full.push(rest);
                    }
                }
                return Ok(Resolved {
                    path: full,
                    node: Node::Missing,
                    existing,
                });
            }
            Node::File if !todo.is_empty() => {
                return Err(ResolveError::NotADirectory {
                    path: start,
                    at: candidate,
                });
            }
            Node::Dir | Node::File => {
                cur = candidate;
                if todo.is_empty() {
                    return Ok(Resolved {
                        path: cur.clone(),
                        node,
                        existing: cur,
                    });
                }
            }
        }
    }
    Ok(Resolved {
        path: cur.clone(),
        node: Node::Dir,
        existing: cur,
    })
}

/// A [`Lookup`] over a real directory that stands for the container root.
#[derive(Debug, Clone)]
pub struct DirLookup {
    /// The host directory that is the container's `/`.
    pub root: PathBuf,
}

impl DirLookup {
    /// The host path of a container path.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        host_path(&self.root, path)
    }
}

/// The host path of `path` (absolute, inside the container) under `root`.
pub fn host_path(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(rel) if rel.as_os_str().is_empty() => root.to_owned(),
        Ok(rel) => root.join(rel),
        Err(_) => root.join(path),
    }
}

impl Lookup for DirLookup {
    fn node(&self, path: &Path) -> std::io::Result<Node> {
        let p = self.host_path(path);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => Ok(Node::Symlink(std::fs::read_link(&p)?)),
            Ok(m) if m.is_dir() => Ok(Node::Dir),
            Ok(_) => Ok(Node::File),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Node::Missing),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Tree(HashMap<PathBuf, Node>);

    impl Lookup for Tree {
        fn node(&self, path: &Path) -> std::io::Result<Node> {
            Ok(self.0.get(path).cloned().unwrap_or(Node::Missing))
        }
    }

    fn tree() -> Tree {
        let mut m = HashMap::new();
        for d in [
            "/usr", "/usr/lib", "/run", "/etc", "/home", "/opt", "/opt/a",
        ] {
            m.insert(PathBuf::from(d), Node::Dir);
        }
        m.insert("/etc/passwd".into(), Node::File);
        let links = [
            ("/var", "/usr/var-real"),
            ("/lib", "usr/lib"),
            ("/vrun", "/run"),
            ("/escape", "../../../etc"),
            ("/escape_abs", "/../../etc"),
            ("/opt/a/up", "../../etc"),
            ("/loop1", "/loop2"),
            ("/loop2", "/loop1"),
            ("/pw", "/etc/passwd"),
            ("/dangling", "/nowhere/deeper"),
        ];
        for (l, t) in links {
            m.insert(PathBuf::from(l), Node::Symlink(PathBuf::from(t)));
        }
        m.insert("/usr/var-real".into(), Node::Dir);
        Tree(m)
    }

    fn ok(p: &str) -> Resolved {
        resolve_in_root(&tree(), Path::new(p)).unwrap()
    }

    #[test]
    fn plain_existing_paths() {
        assert_eq!(ok("/").path, PathBuf::from("/"));
        let r = ok("/usr/lib");
        assert_eq!(
            (r.path.as_path(), &r.node),
            (Path::new("/usr/lib"), &Node::Dir)
        );
        assert_eq!(ok("/etc/passwd").node, Node::File);
        assert_eq!(ok("/etc/./passwd").path, PathBuf::from("/etc/passwd"));
        assert_eq!(ok("/usr/../etc").path, PathBuf::from("/etc"));
    }

    #[test]
    fn symlinks_are_followed_inside_the_root() {
        assert_eq!(ok("/lib").path, PathBuf::from("/usr/lib"));
        assert_eq!(ok("/vrun/x").path, PathBuf::from("/run/x"));
        assert_eq!(ok("/var/run").path, PathBuf::from("/usr/var-real/run"));
        assert_eq!(ok("/pw").node, Node::File);
        assert_eq!(ok("/pw").path, PathBuf::from("/etc/passwd"));
        // `..` inside the root is fine.
        assert_eq!(ok("/opt/a/up").path, PathBuf::from("/etc"));
    }

    #[test]
    fn missing_paths_report_the_existing_prefix() {
        let r = ok("/home/tuser/work");
        assert_eq!(r.node, Node::Missing);
        assert_eq!(r.path, PathBuf::from("/home/tuser/work"));
        assert_eq!(r.existing, PathBuf::from("/home"));
        let r = ok("/dangling/x");
        assert_eq!(r.path, PathBuf::from("/nowhere/deeper/x"));
        assert_eq!(r.existing, PathBuf::from("/"));
        let r = ok("/vrun/a/b");
        assert_eq!((r.path, r.existing), ("/run/a/b".into(), "/run".into()));
    }

    #[test]
    fn escaping_symlinks_are_errors() {
        for p in ["/escape", "/escape/x", "/escape_abs/passwd"] {
            match resolve_in_root(&tree(), Path::new(p)) {
                Err(ResolveError::SymlinkEscapes { link, .. }) => {
                    assert!(
                        link.to_string_lossy().starts_with("/escape"),
                        "{p}: {link:?}"
                    )
                }
                other => panic!("{p}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_errors() {
        let t = tree();
        assert!(matches!(
            resolve_in_root(&t, Path::new("relative")),
            Err(ResolveError::NotAbsolute { .. })
        ));
        assert!(matches!(
            resolve_in_root(&t, Path::new("/../etc")),
            Err(ResolveError::ClimbsAboveRoot { .. })
        ));
        assert!(matches!(
            resolve_in_root(&t, Path::new("/loop1")),
            Err(ResolveError::Loop { .. })
        ));
        assert!(matches!(
            resolve_in_root(&t, Path::new("/etc/passwd/x")),
            Err(ResolveError::NotADirectory { .. })
        ));
        assert!(matches!(
            resolve_in_root(&t, Path::new("/home/a/../../..")),
            Err(ResolveError::ClimbsAboveRoot { .. })
        ));
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c")).unwrap(),
            PathBuf::from("/a/c")
        );
        assert!(normalize(Path::new("/a/../..")).is_err());
    }

    #[test]
    fn dir_lookup_reads_a_real_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("usr")).unwrap();
        std::os::unix::fs::symlink("usr", d.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("../../..", d.path().join("up")).unwrap();
        let l = DirLookup {
            root: d.path().to_owned(),
        };
        assert_eq!(
            resolve_in_root(&l, Path::new("/lib")).unwrap().path,
            PathBuf::from("/usr")
        );
        assert!(matches!(
            resolve_in_root(&l, Path::new("/up/etc")),
            Err(ResolveError::SymlinkEscapes { .. })
        ));
        assert_eq!(l.host_path(Path::new("/")), d.path());
    }
}
