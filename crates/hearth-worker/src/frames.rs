//! Async reading and writing of `hearth_proto` frames over a sandbox's pipes.

use hearth_proto::{Frame, FrameError, parse_prefix};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read one frame. End of stream before a frame starts is [`FrameError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin, M: DeserializeOwned>(
    r: &mut R,
) -> Result<Frame<M>, FrameError> {
    let mut prefix = [0u8; 9];
    let mut got = 0;
    while got < prefix.len() {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    let (hl, bl) = parse_prefix(&prefix)?;
    let mut header = vec![0u8; hl as usize];
    r.read_exact(&mut header).await?;
    let mut body = vec![0u8; bl as usize];
    r.read_exact(&mut body).await?;
    Ok(Frame {
        msg: serde_json::from_slice(&header)?,
        body,
    })
}

/// Write one frame and flush.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    w: &mut W,
    msg: &M,
    body: &[u8],
) -> Result<(), FrameError> {
    let bytes = hearth_proto::encode(msg, body)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::AgentMsg;

    #[tokio::test]
    async fn async_round_trip_matches_sync_encoding() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, &AgentMsg::Log, &vec![7u8; 1000])
                .await
                .unwrap();
            write_frame(&mut a, &AgentMsg::InitDone { init_ms: 1.5 }, b"")
                .await
                .unwrap();
        });
        let f: Frame<AgentMsg> = read_frame(&mut b).await.unwrap();
        assert_eq!(f.msg, AgentMsg::Log);
        assert_eq!(f.body.len(), 1000);
        let f: Frame<AgentMsg> = read_frame(&mut b).await.unwrap();
        assert_eq!(f.msg, AgentMsg::InitDone { init_ms: 1.5 });
        writer.await.unwrap();
        assert!(matches!(
            read_frame::<_, AgentMsg>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }
}
