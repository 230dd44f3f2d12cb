//! A webhook receiver for the rules' `http` action: a real HTTP/1.1 server (hyper) on
//! `127.0.0.1:0` that records every request and answers as the test tells it — a status, or no
//! answer at all for a while (a receiver that hangs).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This HTTP status.
    Status(u16),
    /// Nothing for this long, then 200 (the client should have given up by then).
    Hang(Duration),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method (`POST`).
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// How it was answered.
    pub answer: Answer,
}

impl Received {
    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the webhook body is JSON")
    }

    /// A header's value (`""` when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct Script {
    next: VecDeque<Answer>,
    otherwise: Option<Answer>,
}

/// The receiver; it stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    requests: tokio::sync::mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Listen on `127.0.0.1:0`; the first requests get `first` in order, later ones 200.
    pub async fn start(first: &[Answer]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            next: first.iter().copied().collect(),
            otherwise: None,
        }));
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let s = script.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, tx) = (s.clone(), tx.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (s, tx) = (s.clone(), tx.clone());
                        async move { answer(req, &s, &tx).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            script,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// From now on, answer every request (after the scripted ones) with `a`.
    pub fn answer_all(&self, a: Answer) {
        let mut s = self.script.lock().unwrap();
        s.next.clear();
        s.otherwise = Some(a);
    }

    /// The next request, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.requests.recv())
            .await
            .ok()
            .flatten()
    }

    /// Requests already received and not yet taken.
    pub fn taken_now(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(r) = self.requests.try_recv() {
            out.push(r);
        }
        out
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    script: &Mutex<Script>,
    tx: &tokio::sync::mpsc::UnboundedSender<Received>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let answer = {
        let mut s = script.lock().unwrap();
        s.next
            .pop_front()
            .or(s.otherwise)
            .unwrap_or(Answer::Status(200))
    };
    let _ = tx.send(Received {
        method,
        path,
        headers,
        body,
        answer,
    });
    let status = match answer {
        Answer::Status(s) => s,
        Answer::Hang(d) => {
            tokio::time::sleep(d).await;
            200
        }
    };
    Ok(hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap())
}
