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
        OutputTag::TagOutput => format!(
            "[1,{rank}]<{}>:",
            match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            }
        ),
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

    /// The same, each line also starting with `[TIME] ` (UTC, RFC 3339 with milliseconds).
    pub fn with_timestamps(mut self, on: bool) -> LineBuffer {
        self.timestamps = on;
        self
    }

    fn start_line(&self, out: &mut Vec<u8>) {
        if self.timestamps {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            out.extend_from_slice(format!("[{now}] ").as_bytes());
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

impl Stream {
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
        let mut b = LineBuffer::new("[0] ".into()).with_timestamps(true);
        let mut out = Vec::new();
        b.push(b"a\nb", &mut out);
        b.finish(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with('[') && lines[0].ends_with("Z] [0] a"),
            "{text}"
        );
        assert!(lines[1].ends_with("Z] [0] b"), "{text}");
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
