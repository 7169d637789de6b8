//! The PMI-1 and PMI-2 "simple" wire protocols: an incremental decoder and an encoder.
//!
//! Both wires can appear on the same connection (a PMI-2 client opens with a PMI-1 `cmd=init`
//! line), so the decoder tells them apart per message, the way MPICH's `PMIU_check_full_cmd`
//! does: a message that starts with `cmd=` or `mcmd=` is PMI-1, anything else must be a PMI-2
//! message with a six-byte length field.
//!
//! [`decode`] is a pure function over a byte buffer: it never reads a socket, never allocates
//! more than the message it returns and never panics, which makes it the fuzzing target.
//!
//! ```
//! use cmpirun_pmi::wire::{decode, Decoded, Wire};
//!
//! let buf = b"cmd=init pmi_version=1 pmi_subversion=1\n    14cmd=kvs-fence;";
//! let Decoded::Message(first, used) = decode(buf, 1024).unwrap() else { panic!() };
//! assert_eq!((first.wire, first.cmd.as_str()), (Wire::V1, "init"));
//! let Decoded::Message(second, _) = decode(&buf[used..], 1024).unwrap() else { panic!() };
//! assert_eq!((second.wire, second.cmd.as_str()), (Wire::V2, "kvs-fence"));
//! ```

use std::fmt::Write as _;

/// Largest message the decoder accepts unless told otherwise. PMI-1 clients use 1024-byte
/// lines; PMI-2 values are at most 1024 bytes too, so 64 KiB leaves room for spawn commands
/// without letting a broken client make the server allocate without bound.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// Which wire a message travelled on; a reply goes back on the wire of its query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wire {
    /// PMI-1: `cmd=name key=value …\n` (and the multi-line `mcmd=spawn` … `endcmd` block).
    V1,
    /// PMI-2: six-byte length, then `cmd=name;key=value;…;` without a newline.
    V2,
}

/// One decoded PMI message: its command name and its key/value pairs in wire order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The wire the message came on (or is to be sent on).
    pub wire: Wire,
    /// The command name (`init`, `kvs-put`, …), the value of `cmd=` (or `mcmd=`).
    pub cmd: String,
    /// The remaining pairs, in the order they were sent. A PMI-1 key without `=` has an
    /// empty value.
    pub pairs: Vec<(String, String)>,
}

impl Message {
    /// A message with no pairs yet.
    pub fn new(wire: Wire, cmd: impl Into<String>) -> Self {
        Self {
            wire,
            cmd: cmd.into(),
            pairs: Vec::new(),
        }
    }

    /// Builder: append one pair.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.pairs.push((key.into(), value.into()));
        self
    }

    /// Append one pair.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.pairs.push((key.into(), value.into()));
    }

    /// The value of the first pair named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` parsed as a decimal integer (leading/trailing blanks ignored).
    pub fn get_int(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// The bytes to put on the socket.
    ///
    /// PMI-1 values are written as given (like hydra does), except that a newline, CR or NUL
    /// would end the line early and becomes a space. PMI-2 values escape `;` as `;;`, which old
    /// clients (MPICH ≤ 4.0, Slurm's libpmi2) undo.
    pub fn encode(&self) -> Vec<u8> {
        match self.wire {
            Wire::V1 => {
                let mut line = format!("cmd={}", self.cmd);
                for (k, v) in &self.pairs {
                    line.push(' ');
                    line.push_str(k);
                    line.push('=');
                    line.extend(v.chars().map(|c| match c {
                        '\n' | '\r' | '\0' => ' ',
                        c => c,
                    }));
                }
                line.push('\n');
                line.into_bytes()
            }
            Wire::V2 => {
                let mut body = format!("cmd={};", self.cmd.replace(';', ";;"));
                for (k, v) in &self.pairs {
                    let _ = write!(body, "{k}={};", v.replace(';', ";;"));
                }
                // Right-aligned like MPICH >= 4.1 ("%6u"); every reader uses atoi/strtol on the
                // six bytes, which skips leading blanks.
                let mut out = format!("{:>6}", body.len()).into_bytes();
                out.extend_from_slice(body.as_bytes());
                out
            }
        }
    }
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message (or the part received so far) is larger than the limit.
    #[error("PMI message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared (PMI-2) or received-so-far (PMI-1) size.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The bytes are not a PMI message.
    #[error("malformed PMI message: {reason}")]
    Malformed {
        /// What was wrong, with a short excerpt.
        reason: String,
    },
}

/// The outcome of [`decode`] on a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole message, and how many bytes of the buffer it used.
    Message(Message, usize),
    /// The buffer holds only the start of a message; read more and call again.
    Incomplete,
}

fn malformed(reason: impl Into<String>) -> WireError {
    WireError::Malformed {
        reason: reason.into(),
    }
}

fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(40)];
    String::from_utf8_lossy(cut).escape_debug().to_string()
}

/// Decode the first message in `buf`, accepting at most `max` bytes for it.
///
/// Returns [`Decoded::Incomplete`] when more bytes are needed, and an error when the bytes can
/// never become a valid message (wrong start, bad length field, over `max`).
pub fn decode(buf: &[u8], max: usize) -> Result<Decoded, WireError> {
    let Some(&first) = buf.first() else {
        return Ok(Decoded::Incomplete);
    };
    match first {
        b'c' | b'm' => decode_v1(buf, max),
        b' ' | b'0'..=b'9' => decode_v2(buf, max),
        _ => Err(malformed(format!(
            "expected \"cmd=\" or a PMI-2 length, got \"{}\"",
            excerpt(buf)
        ))),
    }
}

fn decode_v1(buf: &[u8], max: usize) -> Result<Decoded, WireError> {
    let prefix_ok = |p: &[u8]| buf.len() < p.len() && p.starts_with(buf) || buf.starts_with(p);
    let multi = if prefix_ok(b"mcmd=") && buf[0] == b'm' {
        true
    } else if prefix_ok(b"cmd=") {
        false
    } else {
        return Err(malformed(format!(
            "expected \"cmd=\" or \"mcmd=\", got \"{}\"",
            excerpt(buf)
        )));
    };
    let end = if multi {
        find_endcmd(buf)
    } else {
        buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
    };
    let Some(end) = end else {
        if buf.len() > max {
            return Err(WireError::TooLarge {
                len: buf.len(),
                max,
            });
        }
        return Ok(Decoded::Incomplete);
    };
    if end > max {
        return Err(WireError::TooLarge { len: end, max });
    }
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| malformed(format!("not UTF-8: \"{}\"", excerpt(buf))))?;
    let msg = if multi {
        parse_mcmd(text)?
    } else {
        parse_v1_line(text.trim_end_matches(['\n', '\r']))?
    };
    Ok(Decoded::Message(msg, end))
}

/// End (exclusive) of an `mcmd=` block: the byte after the `endcmd` line.
fn find_endcmd(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        if line == b"endcmd" || line == b"endcmd\r" {
            return Some(start + nl + 1);
        }
        start += nl + 1;
    }
    None
}

fn parse_v1_line(line: &str) -> Result<Message, WireError> {
    // A stray CR (a client writing CRLF) separates like a blank.
    let mut tokens = line.split([' ', '\r']).filter(|t| !t.is_empty());
    let cmd = match tokens.next().and_then(|t| t.strip_prefix("cmd=")) {
        Some(c) if !c.is_empty() => c.to_owned(),
        _ => {
            return Err(malformed(format!(
                "PMI-1 line without a command: \"{}\"",
                excerpt(line.as_bytes())
            )));
        }
    };
    let mut msg = Message::new(Wire::V1, cmd);
    for token in tokens {
        match token.split_once('=') {
            Some((k, v)) if !k.is_empty() => msg.push(k, v),
            Some(_) => {
                return Err(malformed(format!(
                    "PMI-1 pair without a key in \"{}\"",
                    excerpt(line.as_bytes())
                )));
            }
            // MPICH writes abort messages with unescaped spaces ("message=application called
            // MPI_Abort…"); a bare word continues the previous value.
            None => match msg.pairs.last_mut() {
                Some((_, v)) => {
                    v.push(' ');
                    v.push_str(token);
                }
                None => msg.push(token, ""),
            },
        }
    }
    Ok(msg)
}

fn parse_mcmd(text: &str) -> Result<Message, WireError> {
    let mut lines = text.lines();
    let cmd = match lines.next().and_then(|l| l.strip_prefix("mcmd=")) {
        Some(c) if !c.trim().is_empty() && !c.trim().contains(char::is_whitespace) => {
            c.trim().to_owned()
        }
        _ => return Err(malformed("mcmd block without a one-word command")),
    };
    let mut msg = Message::new(Wire::V1, cmd);
    for line in lines {
        let line = line.trim_end_matches('\r');
        if line == "endcmd" {
            break;
        }
        match line.split_once('=') {
            Some((k, v)) => msg.push(k, v),
            None if line.is_empty() => {}
            None => msg.push(line, ""),
        }
    }
    Ok(msg)
}

fn decode_v2(buf: &[u8], max: usize) -> Result<Decoded, WireError> {
    if buf.len() < 6 {
        if let Some(bad) = buf.iter().find(|b| !(b.is_ascii_digit() || **b == b' ')) {
            return Err(malformed(format!(
                "PMI-2 length field contains {:?}",
                char::from(*bad)
            )));
        }
        return Ok(Decoded::Incomplete);
    }
    let field = &buf[..6];
    let digits = std::str::from_utf8(field)
        .ok()
        .map(str::trim)
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            malformed(format!(
                "PMI-2 length field \"{}\" is not a number",
                excerpt(field)
            ))
        })?;
    let len: usize = digits
        .parse()
        .map_err(|_| malformed(format!("PMI-2 length field \"{digits}\" is not a number")))?;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if buf.len() < 6 + len {
        return Ok(Decoded::Incomplete);
    }
    let body = std::str::from_utf8(&buf[6..6 + len])
        .map_err(|_| malformed(format!("PMI-2 body is not UTF-8: \"{}\"", excerpt(buf))))?;
    Ok(Decoded::Message(parse_v2_body(body)?, 6 + len))
}

/// Split a PMI-2 body into pairs; `;;` inside a value stands for one `;`.
fn parse_v2_body(body: &str) -> Result<Message, WireError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Key: up to '='.
        let key_end = body[i..].find(['=', ';']).map(|p| i + p);
        let Some(key_end) = key_end.filter(|&e| bytes[e] == b'=') else {
            let rest = body[i..].trim_end_matches(['\n', '\0']);
            if rest.is_empty() || rest == ";" {
                break;
            }
            return Err(malformed(format!(
                "PMI-2 pair without '=' in \"{}\"",
                excerpt(body.as_bytes())
            )));
        };
        let key = &body[i..key_end];
        if key.is_empty() {
            return Err(malformed(format!(
                "PMI-2 pair without a key in \"{}\"",
                excerpt(body.as_bytes())
            )));
        }
        let mut value = String::new();
        let mut j = key_end + 1;
        let mut start = j;
        loop {
            match bytes[j..].iter().position(|&b| b == b';') {
                Some(p) => {
                    let semi = j + p;
                    if bytes.get(semi + 1) == Some(&b';') {
                        value.push_str(&body[start..semi]);
                        value.push(';');
                        j = semi + 2;
                        start = j;
                    } else {
                        value.push_str(&body[start..semi]);
                        j = semi + 1;
                        break;
                    }
                }
                None => {
                    // The last pair may lack its ';' (lenient, like MPICH's parser).
                    value.push_str(body[start..].trim_end_matches(['\n', '\0']));
                    j = bytes.len();
                    break;
                }
            }
        }
        pairs.push((key.to_owned(), value));
        i = j;
    }
    let mut iter = pairs.into_iter();
    match iter.next() {
        Some((k, v)) if k == "cmd" && !v.is_empty() => Ok(Message {
            wire: Wire::V2,
            cmd: v,
            pairs: iter.collect(),
        }),
        _ => Err(malformed(format!(
            "PMI-2 message does not start with \"cmd=\": \"{}\"",
            excerpt(body.as_bytes())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> (Message, usize) {
        match decode(buf, DEFAULT_MAX_MESSAGE).unwrap() {
            Decoded::Message(m, n) => (m, n),
            Decoded::Incomplete => panic!("incomplete: {buf:?}"),
        }
    }

    #[test]
    fn v1_line() {
        let (m, n) = one(b"cmd=put kvsname=kvs_1 key=a value=b=c\ncmd=x");
        assert_eq!(n, 38);
        assert_eq!(m.cmd, "put");
        assert_eq!(m.get("value"), Some("b=c"));
        assert_eq!(m.get("kvsname"), Some("kvs_1"));
    }

    #[test]
    fn v1_abort_message_with_spaces() {
        let (m, _) =
            one(b"cmd=abort exitcode=7 message=application called MPI_Abort(MPI_COMM_WORLD, 7)\n");
        assert_eq!(m.get_int("exitcode"), Some(7));
        assert_eq!(
            m.get("message"),
            Some("application called MPI_Abort(MPI_COMM_WORLD, 7)")
        );
    }

    #[test]
    fn v2_both_paddings() {
        for buf in [&b"    14cmd=kvs-fence;"[..], &b"14    cmd=kvs-fence;"[..]] {
            let (m, n) = one(buf);
            assert_eq!((m.wire, m.cmd.as_str(), n), (Wire::V2, "kvs-fence", 20));
        }
    }

    #[test]
    fn v2_escapes_and_fullinit_variants() {
        let body = "cmd=kvs-put;key=k;value=a;;b;;;";
        let buf = format!("{:<6}{body}", body.len());
        let (m, _) = one(buf.as_bytes());
        assert_eq!(m.get("value"), Some("a;b;"));
        for body in [
            "cmd=fullinit;pmijobid=7.0;pmirank=3;threaded=FALSE;",
            "cmd=fullinit;pmirank=3;",
            "cmd=fullinit;srcid=3;pmijobid=7.0;pmirank=3;threaded=TRUE;",
            "cmd=fullinit;",
        ] {
            let buf = format!("{:>6}{body}", body.len());
            let (m, _) = one(buf.as_bytes());
            assert_eq!(m.cmd, "fullinit");
        }
    }

    #[test]
    fn incremental() {
        let full = b"cmd=init pmi_version=2 pmi_subversion=0\n";
        for cut in 0..full.len() {
            assert_eq!(decode(&full[..cut], 1024), Ok(Decoded::Incomplete), "{cut}");
        }
        let v2 = b"    14cmd=kvs-fence;";
        for cut in 0..v2.len() {
            assert_eq!(decode(&v2[..cut], 1024), Ok(Decoded::Incomplete), "{cut}");
        }
    }

    #[test]
    fn limits_and_garbage() {
        assert!(matches!(
            decode(b"999999cmd=", 1024),
            Err(WireError::TooLarge { len: 999999, .. })
        ));
        let long = vec![b'c'; 2000];
        assert!(matches!(
            decode(&long, 1024),
            Err(WireError::Malformed { .. })
        ));
        let mut long = b"cmd=put value=".to_vec();
        long.resize(2000, b'x');
        assert!(matches!(
            decode(&long, 1024),
            Err(WireError::TooLarge { .. })
        ));
        assert!(decode(b"GET / HTTP/1.1\r\n", 1024).is_err());
        assert!(decode(b"  x   cmd=a;", 1024).is_err());
        assert!(decode(b"     9nocmd=a;;", 1024).is_err());
        assert!(decode(b"cmd=\n", 1024).is_err());
    }

    #[test]
    fn mcmd_block() {
        let buf = b"mcmd=spawn\nnprocs=2\nexecname=/bin/x\ntotspawns=1\nspawnssofar=1\nendcmd\n";
        let (m, n) = one(buf);
        assert_eq!(n, buf.len());
        assert_eq!(m.cmd, "spawn");
        assert_eq!(m.get("totspawns"), Some("1"));
    }

    /// A deterministic stand-in for the fuzz target, so the property is checked on every test
    /// run: random byte soups built from protocol fragments never panic the decoder.
    #[test]
    fn random_fragments_never_panic() {
        const PARTS: &[&[u8]] = &[
            b"cmd=",
            b"mcmd=",
            b"endcmd\n",
            b"    12",
            b"12    ",
            b"999999",
            b";",
            b";;",
            b"=",
            b" ",
            b"\n",
            b"\r",
            b"\0",
            b"key",
            b"value",
            b"spawn",
            b"\xff",
            b"0",
            b"7",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut data = Vec::new();
            for _ in 0..(next() % 12) {
                data.extend_from_slice(PARTS[(next() % PARTS.len() as u64) as usize]);
            }
            let mut rest = &data[..];
            while let Ok(Decoded::Message(msg, used)) = decode(rest, 64) {
                assert!(used > 0 && used <= rest.len() && used <= 64, "{data:?}");
                let again = msg.encode();
                if let Ok(Decoded::Message(back, n)) = decode(&again, usize::MAX) {
                    assert_eq!(n, again.len(), "{data:?}");
                    assert_eq!(back.cmd, msg.cmd, "{data:?}");
                }
                rest = &rest[used..];
            }
        }
    }

    #[test]
    fn roundtrip() {
        for wire in [Wire::V1, Wire::V2] {
            let m = Message::new(wire, "kvs-get-response")
                .with("rc", "0")
                .with("value", "x;y");
            let bytes = m.encode();
            let (back, n) = one(&bytes);
            assert_eq!(n, bytes.len());
            assert_eq!(back, m);
        }
    }
}
