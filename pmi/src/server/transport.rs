//! The PMI server's transport: the ranks' sockets (inherited socketpairs and accepted loopback
//! TCP connections), the wake pipe the launcher pokes, one `poll(2)` over all of them, and the
//! bytes in and out of each connection. It knows the wire codec but not what a message means:
//! whole messages go up to the job, replies come down as [`Message`]s to queue.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::wire::{Decoded, Message, WireError, decode};

use super::error::{PmiError, io_err};
use super::job::ConnId;

/// Unsent replies a connection may accumulate before the client is declared broken.
const MAX_PENDING_OUTPUT: usize = 16 * 1024 * 1024;

/// A rank's socket, of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_nosignal(self.fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One connection: its socket and what is buffered each way.
struct Conn {
    stream: Stream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

/// What one [`Transport::poll`] found ready.
#[derive(Default)]
pub(super) struct Readiness {
    /// The launcher poked the wake pipe.
    pub(super) wake: bool,
    /// The TCP listener has connections to accept.
    pub(super) accept: bool,
    /// Connections with data, an end of file or an error to read.
    pub(super) readable: Vec<ConnId>,
}

/// What one read of a connection brought.
pub(super) struct Received {
    /// The whole messages, in order.
    pub(super) messages: Vec<Message>,
    /// How the connection ended, if it did: after the messages are handled it must be closed.
    pub(super) end: Option<End>,
}

/// Why a connection is over.
pub(super) enum End {
    /// The bytes after the last whole message are not a message.
    Invalid(WireError),
    /// The peer closed it (or reset it) cleanly between messages.
    Closed,
    /// The peer closed it in the middle of a message.
    Truncated(String),
    /// Writing to it failed: the peer is gone.
    Broken,
    /// The client does not read its replies.
    Stalled(String),
}

/// The sockets of one job.
pub(super) struct Transport {
    conns: Vec<Option<Conn>>,
    listener: Option<TcpListener>,
    wake_rx: UnixStream,
    max_message: usize,
}

impl Transport {
    /// A transport with no connection yet, woken through `wake_rx`, refusing messages larger
    /// than `max_message`.
    pub(super) fn new(wake_rx: UnixStream, max_message: usize) -> Self {
        Self {
            conns: Vec::new(),
            listener: None,
            wake_rx,
            max_message,
        }
    }

    /// A new socketpair: the transport keeps one end (non-blocking), the other is returned.
    pub(super) fn add_socketpair(&mut self) -> Result<(ConnId, UnixStream), PmiError> {
        let (ours, theirs) = UnixStream::pair().map_err(io_err("creating a socketpair"))?;
        ours.set_nonblocking(true)
            .map_err(io_err("creating a socketpair"))?;
        Ok((self.add_conn(Stream::Unix(ours)), theirs))
    }

    /// Listen on an ephemeral loopback TCP port; again: the same address.
    pub(super) fn listen_tcp(&mut self) -> Result<SocketAddr, PmiError> {
        if let Some(l) = &self.listener {
            return l.local_addr().map_err(io_err("reading the listen address"));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("listening on loopback TCP"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("listening on loopback TCP"))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the listen address"))?;
        self.listener = Some(listener);
        Ok(addr)
    }

    /// Whether `cid` is still open.
    pub(super) fn is_open(&self, cid: ConnId) -> bool {
        self.conns.get(cid).is_some_and(Option::is_some)
    }

    /// Whether every reply has been written.
    pub(super) fn all_sent(&self) -> bool {
        self.conns.iter().flatten().all(|c| c.outbuf.is_empty())
    }

    /// Queue `msg` on `cid`; nothing when the connection is closed.
    pub(super) fn send(&mut self, cid: ConnId, msg: &Message) {
        if let Some(Some(conn)) = self.conns.get_mut(cid) {
            conn.outbuf.extend_from_slice(&msg.encode());
        }
    }

    /// Close `cid`, dropping what it had not sent.
    pub(super) fn close(&mut self, cid: ConnId) {
        if let Some(slot) = self.conns.get_mut(cid) {
            *slot = None;
        }
    }

    /// Empty the wake pipe.
    pub(super) fn drain_wake(&mut self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Wait until something is ready or `timeout` passes; an interrupted wait reports nothing.
    pub(super) fn poll(&mut self, timeout: PollTimeout) -> Result<Readiness, PmiError> {
        let mut ids = Vec::new();
        let mut fds = vec![PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN)];
        if let Some(l) = &self.listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let first_conn = fds.len();
        for (cid, conn) in self.conns.iter().enumerate() {
            if let Some(conn) = conn {
                let mut flags = PollFlags::POLLIN;
                if !conn.outbuf.is_empty() {
                    flags |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(conn.stream.fd(), flags));
                ids.push(cid);
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Readiness::default()),
            Err(e) => {
                return Err(PmiError::Io {
                    what: "waiting for PMI clients",
                    source: e.into(),
                });
            }
        }
        let hit = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let mut ready = Readiness {
            wake: hit(&fds[0]),
            accept: self.listener.is_some() && hit(&fds[1]),
            readable: Vec::new(),
        };
        for (i, fd) in fds[first_conn..].iter().enumerate() {
            if hit(fd) {
                ready.readable.push(ids[i]);
            }
        }
        Ok(ready)
    }

    fn add_conn(&mut self, stream: Stream) -> ConnId {
        let conn = Conn {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
        };
        match self.conns.iter().position(Option::is_none) {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        }
    }

    /// Accept every pending TCP connection: the new connections, or why one could not be
    /// used (EMFILE and friends end the round; the connections there are keep being served).
    pub(super) fn accept_all(&mut self) -> Vec<Result<ConnId, String>> {
        let mut accepted = Vec::new();
        loop {
            let Some(listener) = &self.listener else {
                return accepted;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        accepted.push(Err(format!("cannot use an accepted connection: {e}")));
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    accepted.push(Ok(self.add_conn(Stream::Tcp(stream))));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return accepted,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    accepted.push(Err(format!("accepting a PMI connection failed: {e}")));
                    return accepted;
                }
            }
        }
    }

    /// Read what `cid` has sent: every whole message, and how the connection ended if it did.
    pub(super) fn read(&mut self, cid: ConnId) -> Received {
        let mut received = Received {
            messages: Vec::new(),
            end: None,
        };
        let Some(Some(conn)) = self.conns.get_mut(cid) else {
            return received;
        };
        let eof = fill(conn, self.max_message);
        loop {
            match decode(&conn.inbuf, self.max_message) {
                Ok(Decoded::Message(msg, used)) => {
                    conn.inbuf.drain(..used);
                    received.messages.push(msg);
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    received.end = Some(End::Invalid(e));
                    return received;
                }
            }
        }
        if eof {
            received.end = Some(if conn.inbuf.is_empty() {
                End::Closed
            } else {
                End::Truncated(format!(
                    "connection closed in the middle of a message ({} bytes received: {:?})",
                    conn.inbuf.len(),
                    String::from_utf8_lossy(&conn.inbuf[..conn.inbuf.len().min(40)])
                ))
            });
        }
        received
    }

    /// Write what can be written; the connections that cannot take their replies.
    pub(super) fn flush_all(&mut self) -> Vec<(ConnId, End)> {
        let mut ended = Vec::new();
        for (cid, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot.as_mut() else {
                continue;
            };
            let mut end = None;
            while !conn.outbuf.is_empty() {
                match conn.stream.write(&conn.outbuf) {
                    Ok(0) => {
                        end = Some(End::Broken);
                        break;
                    }
                    Ok(n) => {
                        conn.outbuf.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        end = Some(End::Broken);
                        break;
                    }
                }
            }
            if end.is_none() && conn.outbuf.len() > MAX_PENDING_OUTPUT {
                end = Some(End::Stalled(format!(
                    "client does not read its replies ({} bytes pending)",
                    conn.outbuf.len()
                )));
            }
            if let Some(end) = end {
                // Unsent replies cannot matter to a peer that is gone.
                conn.outbuf.clear();
                ended.push((cid, end));
            }
        }
        ended
    }
}

/// Read from `conn` into its input buffer until the socket is drained; true at the end of file
/// (or a reset: the peer is gone either way).
fn fill(conn: &mut Conn, max_message: usize) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => {
                conn.inbuf.extend_from_slice(&chunk[..n]);
                // A short read drained the socket; poll is level-triggered, so more data or
                // the end of file wakes the loop again. This saves a WouldBlock read per
                // message, half of the server's system calls.
                if n < chunk.len() || conn.inbuf.len() > max_message + chunk.len() {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ECONNRESET and the like: the peer is gone.
            Err(_) => return true,
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that has gone away is an `EPIPE` error here, never a
/// `SIGPIPE` that would kill a launcher which kept the default signal disposition.
pub(super) fn send_nosignal(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, send};
    send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}
