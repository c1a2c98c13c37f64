//! bin/bench's reference row: a bare pre-fork hyper worker, with nothing
//! of forkd's (no request id, metrics, head checks, in-flight table or
//! balancing), to measure forkd's `/healthz` against. Each process binds
//! the port given as its argument with SO_REUSEPORT (the kernel spreads
//! connections, as forkd's `listener = "reuseport"`), runs a
//! current-thread tokio runtime as a forkd worker does, and answers every
//! request `200 ok` over HTTP/1.1 keep-alive. bin/bench starts one per
//! core and ends them.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

async fn hello(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: bare-hyper 127.0.0.1:PORT");
    let std_listener = listener(addr).expect("bind");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let conn =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(hello));
                let _ = conn.await;
            });
        }
    });
}
