//! The container's `/etc/passwd` and `/etc/group`: the image's, plus the user's entry.

/// Returns `image` (the image's file, possibly empty) with every line that names the same entry as
/// `entry` (same name, or same numeric id in field 3) replaced by `entry` at the end.
pub fn merge_account_file(image: &str, entry: &str) -> String {
    let key = |line: &str| {
        let mut f = line.split(':');
        let name = f.next().unwrap_or("").to_owned();
        let id = f.nth(1).unwrap_or("").to_owned();
        (name, id)
    };
    let (name, id) = key(entry);
    let mut out = String::with_capacity(image.len() + entry.len() + 1);
    for line in image.lines() {
        let (n, i) = key(line);
        if !line.trim().is_empty() && (n == name || (!id.is_empty() && i == id)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(entry);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_replaces() {
        let image = "root:x:0:0:root:/root:/bin/bash\nolduser:x:1001:1001::/home/old:/bin/sh\ntuser:x:5:5::/x:/bin/sh\nnobody:x:65534:65534::/:/usr/sbin/nologin";
        let out = merge_account_file(image, "tuser:x:1001:1001::/home/tuser:/bin/bash");
        assert_eq!(
            out,
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/usr/sbin/nologin\ntuser:x:1001:1001::/home/tuser:/bin/bash\n"
        );
        assert_eq!(merge_account_file("", "g:x:7:u"), "g:x:7:u\n");
        assert_eq!(
            merge_account_file("a:x:1:\n\n", "g:x:7:u"),
            "a:x:1:\n\ng:x:7:u\n"
        );
    }
}
