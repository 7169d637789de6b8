//! The socket protocol of a node instance: what it tells its creator, each member and each of
//! its holders.
//!
//! One message is a kind byte (and three spare bytes), a little-endian `u32` payload length,
//! then the payload; descriptors travel with the header (`SCM_RIGHTS`). The instance answers
//! every connection with one message: [`MSG_READY`] with its namespace descriptors and each
//! image's environment changes ([`encode_ready`]), or a failure ([`SetupError`]).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::unistd::Pid;

use super::image_env::ImageEnvError;
use super::{InstanceError, MAX_IMAGES};
use crate::container::executor::RootError;
use crate::container::member_env::{EnvChange, decode_changes, encode_changes};
use crate::exit::{Blame, Fault};
use crate::sys::SysError;
use crate::sys::userns::UserNsError;

/// Ready: the payload is [`encode_ready`]'s (from a holder: its image's encoded changes).
pub const MSG_READY: u8 = b'R';
/// The root could not be built for a reason the user can fix ([`InstanceError::Root`]).
pub const MSG_ROOT: u8 = b'U';
/// The instance failed for another reason ([`InstanceError::Setup`]).
pub const MSG_SETUP: u8 = b'F';
/// No user namespace: the payload is `ERRNO|DETAIL`.
pub const MSG_NO_USERNS: u8 = b'N';
/// The image's environment scripts failed.
pub const MSG_IMAGE_ENV: u8 = b'S';
/// From a holder: it has its own mount namespace now.
pub const MSG_UNSHARED: u8 = b'M';
/// To every member, after the instance is ready: an image mount ended (its server died), so
/// the instance killed every process in its namespace; the payload says which and how.
pub const MSG_MOUNT_LOST: u8 = b'L';

/// From a member's starter (a rank's `cmpirun __rank` task), after the member exited 0: its
/// rank (the payload: a little-endian `u32`). As it ends, the instance reports the ranks it was
/// told of in one report for the node ([`super::InstanceConfig::clean_ends`]).
pub const MSG_ENDED: u8 = b'E';

/// One message as received.
#[derive(Debug)]
pub struct Message {
    /// One of the `MSG_*` kinds.
    pub kind: u8,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Sends one message: a kind byte, a length, optional fds, then the payload.
pub fn send_message(
    sock: &UnixStream,
    kind: u8,
    fds: &[RawFd],
    payload: &[u8],
) -> std::io::Result<()> {
    let len =
        u32::try_from(payload.len()).map_err(|_| std::io::Error::other("message too large"))?;
    let mut header = [0u8; 8];
    header[0] = kind;
    header[4..].copy_from_slice(&len.to_le_bytes());
    let iov = [IoSlice::new(&header)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let mut sent = 0;
    while sent == 0 {
        sent = match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
    }
    let mut w = sock;
    w.write_all(&header[sent..])?;
    w.write_all(payload)
}

/// Receives one message sent by [`send_message`].
pub fn recv_message(sock: &UnixStream) -> Result<Message, InstanceError> {
    const STEP: &str = "read node instance message";
    let mut header = [0u8; 8];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_IMAGES + 1]);
    let mut fds = Vec::new();
    let got = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let cmsgs = msg
                    .cmsgs()
                    .map_err(|errno| InstanceError::Sys { step: STEP, errno })?;
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds in this process for us.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break msg.bytes;
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(InstanceError::Sys { step: STEP, errno }),
        }
    };
    if got == 0 {
        return Err(InstanceError::Vanished);
    }
    let io = |error| InstanceError::Io { step: STEP, error };
    let mut r = sock;
    r.read_exact(&mut header[got..]).map_err(io)?;
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(io)?;
    Ok(Message {
        kind: header[0],
        fds,
        payload,
    })
}

/// The ready message's payload: the instance's pid, then each image's environment changes
/// (length-prefixed).
pub fn encode_ready(pid: Pid, changes: &[Vec<EnvChange>]) -> Vec<u8> {
    let mut out = pid.as_raw().to_le_bytes().to_vec();
    for c in changes {
        let e = encode_changes(c);
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(&e);
    }
    out
}

/// Reads what [`encode_ready`] wrote.
pub fn decode_ready(p: &[u8]) -> Option<(i32, Vec<Vec<EnvChange>>)> {
    let word = |b: &[u8]| -> Option<[u8; 4]> { b.get(..4)?.try_into().ok() };
    let pid = i32::from_le_bytes(word(p)?);
    let mut rest = &p[4..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_le_bytes(word(rest)?) as usize;
        let end = 4usize.checked_add(len)?;
        out.push(decode_changes(rest.get(4..end)?));
        rest = &rest[end..];
    }
    Some((pid, out))
}

/// Why a node instance (or one of its holders) could not get ready. It travels to the creator
/// as a failure message ([`SetupError::send`]) and becomes an [`InstanceError`] there
/// ([`failure_error`]).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Entering the user namespace failed.
    #[error(transparent)]
    UserNs(#[from] UserNsError),
    /// Building a container root failed.
    #[error(transparent)]
    Root(#[from] RootError),
    /// The image's environment scripts failed.
    #[error(transparent)]
    ImageEnv(#[from] ImageEnvError),
    /// A set-up system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A file or socket operation failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being done, naming the path or image.
        step: String,
        /// The error.
        source: std::io::Error,
    },
    /// A holder said it failed, or went away.
    #[error("image {image}: {text}")]
    Holder {
        /// The image the holder builds.
        image: String,
        /// The kind of the failure it reported ([`MSG_SETUP`] when it went away).
        kind: u8,
        /// What it said.
        text: String,
    },
    /// The instance's own message was not what the protocol allows.
    #[error("{0}")]
    Protocol(String),
}

impl SetupError {
    /// The message kind this failure travels as, which becomes the [`InstanceError`] variant
    /// (and so whose it is to fix) on the creator's side.
    fn kind(&self) -> u8 {
        match self {
            SetupError::UserNs(UserNsError::Unshare { .. }) => MSG_NO_USERNS,
            SetupError::ImageEnv(_) => MSG_IMAGE_ENV,
            SetupError::Holder { kind, .. } => *kind,
            other if other.fault() == Fault::User => MSG_ROOT,
            _ => MSG_SETUP,
        }
    }

    /// The failure's payload: the text, or `ERRNO|DETAIL` for a refused user namespace.
    fn payload(&self) -> String {
        match self {
            SetupError::UserNs(UserNsError::Unshare { errno, detail }) => {
                format!("{}|{detail}", *errno as i32)
            }
            other => other.to_string(),
        }
    }

    /// Tells the other end of `sock` about this failure (best effort: it may be gone).
    pub fn send(&self, sock: &UnixStream) {
        // Nothing more can be done if the creator is gone: the instance exits either way.
        let _ = send_message(sock, self.kind(), &[], self.payload().as_bytes());
    }
}

/// The user's to fix: a root that cannot be built from their binds (a holder's failure is
/// judged where the holder made it, by its message kind).
impl Blame for SetupError {
    fn fault(&self) -> Fault {
        match self {
            SetupError::Root(e) => e.fault(),
            SetupError::Holder { kind, .. } => Fault::user_if(*kind == MSG_ROOT),
            _ => Fault::Host,
        }
    }
}

/// The [`InstanceError`] a failure message stands for.
pub fn failure_error(msg: &Message) -> InstanceError {
    let text = msg.text();
    match msg.kind {
        MSG_ROOT => InstanceError::Root(text),
        MSG_NO_USERNS => {
            let (errno, detail) = text.split_once('|').map_or((0, String::new()), |(e, d)| {
                (e.parse().unwrap_or(0), d.to_owned())
            });
            InstanceError::NoUserNamespace {
                errno: Errno::from_raw(errno),
                detail,
            }
        }
        MSG_IMAGE_ENV => InstanceError::ImageEnv(text),
        _ => InstanceError::Setup(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_payload_round_trip() {
        let images = vec![
            vec![EnvChange::Set("PATH".into(), "/opt/a/bin:/bin".into())],
            vec![],
            vec![
                EnvChange::Unset("X".into()),
                EnvChange::Set("IMAGE".into(), "b".into()),
            ],
        ];
        let p = encode_ready(Pid::from_raw(4242), &images);
        assert_eq!(decode_ready(&p), Some((4242, images)));
        // Truncated: no panic, no partial answer.
        assert_eq!(decode_ready(&p[..p.len() - 1]), None);
        assert_eq!(decode_ready(&p[..3]), None);
    }

    fn arrives_as(e: &SetupError) -> InstanceError {
        failure_error(&Message {
            kind: e.kind(),
            fds: Vec::new(),
            payload: e.payload().into_bytes(),
        })
    }

    #[test]
    fn failures_arrive_typed_and_keep_whose_they_are() {
        let missing = SetupError::Root(RootError::SourceMissing {
            path: "/nowhere".into(),
        });
        let got = arrives_as(&missing);
        assert!(matches!(&got, InstanceError::Root(t) if *t == missing.to_string()));
        assert_eq!(got.fault(), Fault::User);
        let order = SetupError::Root(RootError::Order("pivot before mount"));
        let got = arrives_as(&order);
        assert!(matches!(&got, InstanceError::Setup(t) if *t == order.to_string()));
        assert_eq!(got.fault(), Fault::Host);
        let holder = SetupError::Holder {
            image: "b.sif".into(),
            kind: MSG_ROOT,
            text: "bind source /x does not exist on the host".into(),
        };
        assert_eq!(holder.fault(), Fault::User);
        assert!(matches!(arrives_as(&holder), InstanceError::Root(_)));
    }
}
