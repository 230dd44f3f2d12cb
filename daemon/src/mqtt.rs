//! MQTT 3.1.1 framing over any async byte stream, on top of rumqttc's public `mqttbytes` codec.
//!
//! [`read_packet`] is cancel-safe: bytes already read stay in the caller's buffer until a whole
//! frame is there, so it can sit in a `select!` beside other work.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not MQTT 3.1.1 (or exceed the frame limit).
    #[error("malformed MQTT packet: {0}")]
    Malformed(mqttbytes::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a packet ({0} bytes pending)")]
    Truncated(usize),
}

/// Read the next whole packet; `Ok(None)` on a clean end of stream between packets.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<Packet>, FrameError> {
    loop {
        if let Some(&first) = buf.first() {
            // Packet types 0 and 15 are reserved: refuse at the first byte instead of waiting
            // for a frame whose length came from garbage.
            if matches!(first >> 4, 0 | 15) {
                return Err(FrameError::Malformed(mqttbytes::Error::InvalidPacketType(
                    first >> 4,
                )));
            }
            match Packet::read(buf, max_frame_bytes) {
                Ok(p) => return Ok(Some(p)),
                Err(mqttbytes::Error::InsufficientBytes(n)) => buf.reserve(n),
                Err(e) => return Err(FrameError::Malformed(e)),
            }
        }
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Truncated(buf.len()))
            };
        }
    }
}

/// Serialise `packet` into `out` (appending).
pub fn encode(packet: &Packet, out: &mut BytesMut, max_frame_bytes: usize) -> std::io::Result<()> {
    packet
        .write(out, max_frame_bytes + 8)
        .map(|_| ())
        .map_err(std::io::Error::other)
}

/// Serialise and write one packet.
pub async fn write_packet<W: AsyncWrite + Unpin>(
    w: &mut W,
    packet: &Packet,
    max_frame_bytes: usize,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(packet.size() + 8);
    encode(packet, &mut out, max_frame_bytes)?;
    w.write_all(&out).await
}

/// Why the first packet of a connection cannot be taken as an MQTT 3.1.1 CONNECT, found in its
/// bytes before it is parsed (the codec accepts some of these, or fails with a vague error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectProblem {
    /// A known MQTT protocol at a level other than 4 (3.1 is `MQIsdp` level 3, 5.0 is
    /// `MQTT` level 5): answered with CONNACK 0x01, "unacceptable protocol version".
    #[error("protocol `{name}` level {level}; only MQTT 3.1.1 (`MQTT` level 4) is supported")]
    UnsupportedVersion {
        /// The protocol name sent.
        name: String,
        /// The protocol level sent.
        level: u8,
    },
    /// Breaks a rule of MQTT 3.1.1 section 3.1: the connection is closed without a CONNACK.
    #[error("invalid CONNECT: {0}")]
    Invalid(&'static str),
}

/// Check the bytes of one whole CONNECT frame (fixed header first) for what MQTT 3.1.1 says
/// must close the connection: fixed-header flags other than 0, an unknown protocol, the
/// reserved connect flag, inconsistent Will flags, a password without a user name.
pub fn check_connect_frame(frame: &[u8]) -> Result<(), ConnectProblem> {
    use ConnectProblem::Invalid;
    let truncated = Invalid("truncated variable header");
    let (&first, rest) = frame.split_first().ok_or(truncated.clone())?;
    if first != 0x10 {
        return Err(Invalid("fixed-header flags are not 0 (MQTT-2.2.2-2)"));
    }
    // Remaining length: 1 to 4 bytes, high bit = more.
    let len_bytes = rest
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .ok_or(Invalid("malformed remaining length"))?
        + 1;
    let v = rest.get(len_bytes..).ok_or(truncated.clone())?;
    let name_len = usize::from(u16::from_be_bytes([
        *v.first().ok_or(truncated.clone())?,
        *v.get(1).ok_or(truncated.clone())?,
    ]));
    let name = v.get(2..2 + name_len).ok_or(truncated.clone())?;
    let level = *v.get(2 + name_len).ok_or(truncated.clone())?;
    let flags = *v.get(3 + name_len).ok_or(truncated)?;
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT", _) | (b"MQIsdp", _) => {
            return Err(ConnectProblem::UnsupportedVersion {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            })
        }
        _ => return Err(Invalid("unknown protocol name (MQTT-3.1.2-1)")),
    }
    if flags & 0x01 != 0 {
        return Err(Invalid("the reserved connect flag is set (MQTT-3.1.2-3)"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if !will && (will_qos != 0 || will_retain) {
        return Err(Invalid(
            "Will QoS or Will Retain set without the Will flag (MQTT-3.1.2-13, -15)",
        ));
    }
    if will_qos == 3 {
        return Err(Invalid("Will QoS 3 (MQTT-3.1.2-14)"));
    }
    if flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(Invalid("a password without a user name (MQTT-3.1.2-22)"));
    }
    Ok(())
}

/// Read the first packet of a connection like [`read_packet`], but check a CONNECT's bytes
/// with [`check_connect_frame`] before parsing it. `Err(Ok(problem))` is a refused CONNECT,
/// `Err(Err(frame error))` unreadable bytes.
pub async fn read_connect<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<Packet>, Result<ConnectProblem, FrameError>> {
    loop {
        if let Some(&first) = buf.first() {
            if first >> 4 != 1 {
                return read_packet(r, buf, max_frame_bytes).await.map_err(Err);
            }
            match mqttbytes::check(buf.iter(), max_frame_bytes) {
                Ok(header) => {
                    let len = header.frame_length();
                    check_connect_frame(&buf[..len]).map_err(Ok)?;
                    return read_packet(r, buf, max_frame_bytes).await.map_err(Err);
                }
                Err(mqttbytes::Error::InsufficientBytes(n)) => buf.reserve(n),
                Err(e) => return Err(Err(FrameError::Malformed(e))),
            }
        }
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Err(FrameError::Truncated(buf.len()))),
            Ok(_) => {}
            Err(e) => return Err(Err(FrameError::Io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{Connect, LastWill, Login};
    use rumqttc::mqttbytes::QoS;

    fn frame(c: Connect) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(&Packet::Connect(c), &mut out, 1 << 16).unwrap();
        out.to_vec()
    }

    /// Index of the connect-flags byte in a frame with a one-byte remaining length.
    const FLAGS: usize = 1 + 1 + 2 + 4 + 1;

    #[test]
    fn a_valid_3_1_1_connect_passes() {
        let mut c = Connect::new("pm-1");
        c.login = Some(Login::new("pm-1", "pw"));
        c.last_will = Some(LastWill::new(
            "ward/pm-1/alarm",
            "gone",
            QoS::AtLeastOnce,
            true,
        ));
        assert_eq!(check_connect_frame(&frame(c)), Ok(()));
    }

    #[test]
    fn other_protocol_levels_are_unsupported_versions() {
        let mut f = frame(Connect::new("pm-1"));
        f[FLAGS - 1] = 5;
        assert_eq!(
            check_connect_frame(&f),
            Err(ConnectProblem::UnsupportedVersion {
                name: "MQTT".into(),
                level: 5
            })
        );
    }

    #[test]
    fn broken_rules_are_invalid() {
        let base = frame(Connect::new("pm-1"));
        let with = |i: usize, v: u8| {
            let mut f = base.clone();
            f[i] = v;
            check_connect_frame(&f)
        };
        assert!(
            matches!(with(0, 0x11), Err(ConnectProblem::Invalid(_))),
            "header flags"
        );
        let flags = base[FLAGS];
        assert!(
            matches!(with(FLAGS, flags | 0x01), Err(ConnectProblem::Invalid(m)) if m.contains("reserved"))
        );
        assert!(
            matches!(with(FLAGS, flags | 0x20), Err(ConnectProblem::Invalid(_))),
            "retain without will"
        );
        assert!(
            matches!(with(FLAGS, flags | 0x40), Err(ConnectProblem::Invalid(_))),
            "password without user"
        );
        assert!(
            matches!(with(2 + 2, b'X'), Err(ConnectProblem::Invalid(_))),
            "protocol name"
        );
        assert!(matches!(
            check_connect_frame(&base[..6]),
            Err(ConnectProblem::Invalid(_))
        ));
    }
}
