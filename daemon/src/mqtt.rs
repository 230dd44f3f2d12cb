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
