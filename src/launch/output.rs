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
}

impl LineBuffer {
    /// A buffer whose lines get `prefix`.
    pub fn new(prefix: String) -> LineBuffer {
        LineBuffer {
            prefix: prefix.into_bytes(),
            pending: Vec::new(),
        }
    }

    /// Adds `data` and appends every complete line (tagged) to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(&self.pending[start..=start + nl]);
            start += nl + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            out.extend_from_slice(&self.prefix);
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
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&self.pending);
        if !self.prefix.is_empty() {
            out.push(b'\n');
        }
        self.pending.clear();
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
    fn long_lines_are_split() {
        let mut b = LineBuffer::new("[1] ".into());
        let mut out = Vec::new();
        b.push(&vec![b'x'; MAX_LINE + 10], &mut out);
        assert_eq!(out.len(), 4 + MAX_LINE + 1);
        b.finish(&mut out);
        assert_eq!(out.len(), 4 + MAX_LINE + 1 + 4 + 10 + 1);
    }
}
