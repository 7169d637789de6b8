//! Line-wise forwarding of the ranks' stdout and stderr, with optional rank tags.
//!
//! Every rank writes into its own pipes; cmpirun writes whole lines to its own stdout/stderr, so
//! lines of different ranks never interleave mid-line. A last line without a newline is written
//! when the rank's pipe closes. A line longer than [`MAX_LINE`] is written in pieces (each
//! tagged) rather than held without bound.

use std::io::Write;

use crate::jobspec::OutputTag;

/// The longest piece of a line held back waiting for its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// Which of a rank's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The prefix of each line of `rank` on `stream`: `[1,R]<stdout>:` (Open MPI's
/// `--tag-output`), `[R] ` (MPICH's `-l`/`-prepend-rank`), or nothing.
pub fn tag(style: OutputTag, rank: u32, stream: Stream) -> String {
    match style {
        OutputTag::None => String::new(),
        OutputTag::TagOutput => format!("[1,{rank}]<{}>:", stream.word()),
        OutputTag::PrependRank => format!("[{rank}] "),
    }
}

/// One stream of one rank: bytes in, whole tagged lines out.
#[derive(Debug)]
pub struct LineBuffer {
    prefix: Vec<u8>,
    pending: Vec<u8>,
    /// `--timestamp-output`: each line starts with the time it was read.
    timestamps: bool,
}

impl LineBuffer {
    /// A buffer whose lines get `prefix`.
    pub fn new(prefix: String) -> LineBuffer {
        LineBuffer {
            prefix: prefix.into_bytes(),
            pending: Vec::new(),
            timestamps: false,
        }
    }

    /// The same, each line of `stream` also starting with the local time in Open MPI's
    /// `--timestamp-output` form (`Sun Dec  6 17:15:58 2026`, C's `ctime`), followed by the tag,
    /// or by Open MPI's `<stdout>:`/`<stderr>:` when there is none.
    pub fn with_timestamps(mut self, on: bool, stream: Stream) -> LineBuffer {
        self.timestamps = on;
        if on && self.prefix.is_empty() {
            self.prefix = format!("<{}>:", stream.word()).into_bytes();
        }
        self
    }

    fn start_line(&self, out: &mut Vec<u8>) {
        if self.timestamps {
            out.extend_from_slice(ctime_now().as_bytes());
        }
        out.extend_from_slice(&self.prefix);
    }

    /// Adds `data` and appends every complete line (tagged) to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            self.start_line(out);
            out.extend_from_slice(&self.pending[start..=start + nl]);
            start += nl + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            self.start_line(out);
            out.extend_from_slice(&self.pending[..MAX_LINE]);
            out.push(b'\n');
            self.pending.drain(..MAX_LINE);
        }
    }

    /// At end of stream: appends what is left as a last line (with a newline when tagged, so
    /// the next rank's tag starts a line).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending.is_empty() {
            return;
        }
        self.start_line(out);
        out.extend_from_slice(&self.pending);
        if !self.prefix.is_empty() || self.timestamps {
            out.push(b'\n');
        }
        self.pending.clear();
    }
}

/// Where the lines of one stream of one rank go: cmpirun's own standard output or error, or a
/// file of the rank's (`-outfile-pattern`, `--output-filename`; two streams may share one).
#[derive(Debug, Clone)]
pub enum Dest {
    /// cmpirun's standard output or error.
    Terminal(Stream),
    /// A file cmpirun opened for the rank.
    File(std::sync::Arc<std::fs::File>),
}

impl Dest {
    /// Writes `data`; `false` when the reader of cmpirun's own stream went away (see
    /// [`write_out`]). A failed write to a file drops the data with a warning.
    pub fn write(&self, data: &[u8]) -> bool {
        match self {
            Dest::Terminal(stream) => write_out(*stream, data),
            Dest::File(file) => {
                if let Err(e) = (&**file).write_all(data) {
                    tracing::warn!("cannot write a rank's output file: {e}");
                }
                true
            }
        }
    }
}

/// Writes `data` to cmpirun's stdout or stderr. `false`: the stream's reader went away (a
/// closed pipe, `EPIPE`), which ends a job ([`super::status::JobEnd::OutputClosed`]); other
/// write errors drop the data.
pub fn write_out(stream: Stream, data: &[u8]) -> bool {
    if data.is_empty() {
        return true;
    }
    let written = match stream {
        Stream::Stdout => {
            let mut o = std::io::stdout().lock();
            o.write_all(data).and_then(|_| o.flush())
        }
        Stream::Stderr => std::io::stderr().lock().write_all(data),
    };
    !matches!(written, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The local time as C's `ctime` writes it, without its newline: `Sun Dec  6 17:15:58 2026`
/// (Open MPI's `--timestamp-output`); UTC if the local time cannot be had.
pub fn ctime_now() -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: `tm` is plain data that localtime_r fills in (all zeros is a valid value for it);
    // both pointers are to live locals, and localtime_r (unlike localtime) keeps no pointer.
    let (tm, ok) = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let ok =
            !libc::localtime_r(&t, &mut tm).is_null() || !libc::gmtime_r(&t, &mut tm).is_null();
        (tm, ok)
    };
    if !ok {
        return humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    }
    let pick = |names: &[&'static str], i: libc::c_int| {
        usize::try_from(i)
            .ok()
            .and_then(|i| names.get(i).copied())
            .unwrap_or("???")
    };
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        pick(&DAYS, tm.tm_wday),
        pick(&MONTHS, tm.tm_mon),
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        i64::from(tm.tm_year) + 1900
    )
}

impl Stream {
    /// `stdout` or `stderr`, as tags write them.
    pub fn word(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// `standard output` or `standard error`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "standard output",
            Stream::Stderr => "standard error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(
            tag(OutputTag::TagOutput, 3, Stream::Stdout),
            "[1,3]<stdout>:"
        );
        assert_eq!(
            tag(OutputTag::TagOutput, 0, Stream::Stderr),
            "[1,0]<stderr>:"
        );
        assert_eq!(tag(OutputTag::PrependRank, 12, Stream::Stdout), "[12] ");
        assert_eq!(tag(OutputTag::None, 1, Stream::Stdout), "");
    }

    #[test]
    fn whole_lines_only() {
        let mut b = LineBuffer::new("[0] ".into());
        let mut out = Vec::new();
        b.push(b"hel", &mut out);
        assert!(out.is_empty());
        b.push(b"lo\nwor", &mut out);
        assert_eq!(out, b"[0] hello\n");
        b.push(b"ld\n\nx", &mut out);
        assert_eq!(out, b"[0] hello\n[0] world\n[0] \n");
        b.finish(&mut out);
        assert_eq!(out, b"[0] hello\n[0] world\n[0] \n[0] x\n");
    }

    #[test]
    fn untagged_last_line_keeps_its_bytes() {
        let mut b = LineBuffer::new(String::new());
        let mut out = Vec::new();
        b.push(b"a\nb", &mut out);
        b.finish(&mut out);
        assert_eq!(out, b"a\nb");
    }

    #[test]
    fn timestamped_lines() {
        // Open MPI's form: ctime, then the tag.
        let mut b = LineBuffer::new(tag(OutputTag::TagOutput, 0, Stream::Stdout))
            .with_timestamps(true, Stream::Stdout);
        let mut out = Vec::new();
        b.push(b"a\nb", &mut out);
        b.finish(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(&lines[0][24..], "[1,0]<stdout>:a", "{text}");
        assert_eq!(&lines[1][24..], "[1,0]<stdout>:b", "{text}");
        assert!(is_ctime(&lines[0][..24]), "{text}");
        // Untagged: Open MPI's stream tag after the time.
        let mut b = LineBuffer::new(String::new()).with_timestamps(true, Stream::Stderr);
        let mut out = Vec::new();
        b.push(b"e\n", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(&text[24..], "<stderr>:e\n", "{text}");
        assert!(is_ctime(&text[..24]), "{text}");
        // Without timestamps, an untagged line is the rank's own bytes.
        let mut b = LineBuffer::new(String::new()).with_timestamps(false, Stream::Stdout);
        let mut out = Vec::new();
        b.push(b"e\n", &mut out);
        assert_eq!(out, b"e\n");
    }

    /// `Sun Dec  6 17:15:58 2026`.
    fn is_ctime(s: &str) -> bool {
        let b = s.as_bytes();
        s.len() == 24
            && b[3] == b' '
            && b[7] == b' '
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b' '
            && s[20..].bytes().all(|c| c.is_ascii_digit())
    }

    #[test]
    fn long_lines_are_split() {
        let mut b = LineBuffer::new("[1] ".into());
        let mut out = Vec::new();
        b.push(&vec![b'x'; MAX_LINE + 10], &mut out);
        assert_eq!(out.len(), 4 + MAX_LINE + 1);
        b.finish(&mut out);
        assert_eq!(out.len(), 4 + MAX_LINE + 1 + 4 + 10 + 1);
    }
}
