//! Which OpenPMIx a library file is, read from the file itself (the string
//! `PMIx_Get_version()` returns is in its read-only data), and whether a server of one version
//! serves clients of another.
//!
//! PMIx clients and servers negotiate their protocol, and from 2.1.1 on all releases are meant
//! to interoperate; the floors are a server of 3.x or later accepts clients of 2.1 or later, and
//! current clients connect only to servers of 3.2 or later (OpenPMIx's "how does PMIx work with
//! containers" FAQ and PR 4261). Tested here: a 4.2.2 server with 4.2.2 clients (Debian Open
//! MPI 4.1.4) and 5.0.11 clients (the Open MPI 5.0.11 wheel).

/// The `OpenPMIx X.Y.Z[suffix]` version in a library's bytes (`4.2.2rc2`, `5.0.11rc1`).
///
/// Every launch reads the host's libpmix (2 MiB) through this, so the search is memchr's
/// vectorised one, not a byte-by-byte window scan (1.3 ms of CPU per launch before).
pub fn version_in(bytes: &[u8]) -> Option<String> {
    const MARK: &[u8] = b"OpenPMIx ";
    let finder = memchr::memmem::Finder::new(MARK);
    let mut from = 0;
    while let Some(i) = finder.find(&bytes[from..]) {
        let start = from + i + MARK.len();
        let rest = &bytes[start..];
        let len = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'.')
            .count();
        let v = String::from_utf8_lossy(&rest[..len]).into_owned();
        if parse(&v).is_some() {
            return Some(v);
        }
        from = start;
    }
    None
}

/// The `(major, minor, release)` of a version such as `4.2.2rc2` (the suffix is ignored).
pub fn parse(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.');
    let num = |s: Option<&str>| -> Option<u32> {
        let s = s?;
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let major = num(parts.next())?;
    let minor = num(parts.next())?;
    let release = num(parts.next()).unwrap_or(0);
    Some((major, minor, release))
}

/// Whether a server of version `server` serves clients of version `client`: `Err` with the
/// reason when it cannot (both versions named).
pub fn compatible(server: &str, client: &str) -> Result<(), String> {
    let (Some(s), Some(c)) = (parse(server), parse(client)) else {
        return Err(format!(
            "cannot read the versions (server {server:?}, client {client:?})"
        ));
    };
    if c < (2, 1, 0) {
        return Err(format!(
            "the image's PMIx client {client} is older than 2.1, which servers of 3.x and later ({server}) do not accept"
        ));
    }
    if s < (3, 2, 0) {
        return Err(format!(
            "the host's PMIx {server} is older than 3.2, which current PMIx clients ({client}) do not connect to"
        ));
    }
    Ok(())
}

/// Whether the host's libpmix of version `host` can replace an image's of version `image`
/// (injection): the image's MPI was built against its own, and a libpmix keeps the functions of
/// older releases under its one soname (`libpmix.so.2`) but not those of newer ones. So the host's
/// must be of the same or a later release series (major.minor).
pub fn replaces(host: &str, image: &str) -> Result<(), String> {
    let (Some(h), Some(i)) = (parse(host), parse(image)) else {
        return Err(format!(
            "cannot read the versions (host {host:?}, image {image:?})"
        ));
    };
    if (h.0, h.1) < (i.0, i.1) {
        return Err(format!(
            "the host's PMIx {host} is older than the image's {image}, whose MPI may call functions it lacks"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_version_string() {
        let lib = b"\0junk OpenPMIx\0 OpenPMIx v OpenPMIx 4.2.2rc2 (PMIx Standard: 4.2, Stable ABI: 0.0)\0";
        assert_eq!(version_in(lib).as_deref(), Some("4.2.2rc2"));
        assert_eq!(version_in(b"no version here"), None);
        assert_eq!(parse("5.0.11rc1"), Some((5, 0, 11)));
        assert_eq!(parse("3.2"), Some((3, 2, 0)));
        assert_eq!(parse("x"), None);
    }

    #[test]
    fn compatibility_floors() {
        assert_eq!(compatible("4.2.2rc2", "5.0.11rc1"), Ok(()));
        assert_eq!(compatible("4.2.2", "4.2.2"), Ok(()));
        assert_eq!(compatible("5.0.11", "4.2.2"), Ok(()));
        let old_client = compatible("4.2.2", "2.0.3").unwrap_err();
        assert!(
            old_client.contains("2.0.3") && old_client.contains("4.2.2"),
            "{old_client}"
        );
        assert_eq!(replaces("4.2.2", "4.2.1"), Ok(()));
        assert_eq!(replaces("5.0.1", "4.2.2"), Ok(()));
        assert!(replaces("4.2.2", "5.0.11").unwrap_err().contains("older"));
        let old_server = compatible("3.1.6", "5.0.11").unwrap_err();
        assert!(
            old_server.contains("3.1.6") && old_server.contains("5.0.11"),
            "{old_server}"
        );
    }
}
