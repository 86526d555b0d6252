//! A real gRPC service (tonic's server and client machinery with a prost message; no protoc or
//! generated code) behind clerkgate with `proxy.upstream_protocol = "h2c"`: unary and server
//! streaming calls pass with their trailers and the verified identity, a refused call is a
//! `grpc-status` the tonic client reads as `UNAUTHENTICATED`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::support::sidecar::{base_toml, config};
use crate::support::{FakeClerk, Sidecar};

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

type Codec = ProstCodec<Msg, Msg>;

/// The identity each call carried, as the service read it from its metadata.
type Users = Arc<Mutex<Vec<String>>>;

fn user_of(req: &tonic::Request<Msg>) -> String {
    req.metadata()
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// `Unary`: the user and the reversed text.
struct Unary(Users);

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = Ready<Result<tonic::Response<Msg>, Status>>;

    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let user = user_of(&req);
        self.0.lock().unwrap().push(user.clone());
        let text: String = req.into_inner().text.chars().rev().collect();
        ready(Ok(tonic::Response::new(Msg {
            text: format!("{user}:{text}"),
        })))
    }
}

/// `Count`: one message per number up to the request's.
struct Count(Users);

type CountStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Msg, Status>>>;

impl tonic::server::ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = CountStream;
    type Future = Ready<Result<tonic::Response<CountStream>, Status>>;

    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        self.0.lock().unwrap().push(user_of(&req));
        let n: usize = req.into_inner().text.parse().unwrap_or(0);
        let items: Vec<_> = (1..=n)
            .map(|i| {
                Ok(Msg {
                    text: i.to_string(),
                })
            })
            .collect();
        ready(Ok(tonic::Response::new(futures_util::stream::iter(items))))
    }
}

async fn serve_grpc(users: Users) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let users = users.clone();
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let users = users.clone();
                async move {
                    let mut grpc = tonic::server::Grpc::new(Codec::default());
                    let resp = match req.uri().path() {
                        "/echo.Echo/Unary" => grpc.unary(Unary(users), req).await,
                        "/echo.Echo/Count" => grpc.server_streaming(Count(users), req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    url
}

/// tonic's client over a hyper HTTP/2 connection to clerkgate.
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn grpc_client(gate: &Sidecar) -> tonic::client::Grpc<H2> {
    let stream = TcpStream::connect(gate.proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let origin = format!("http://{}", gate.proxy).parse().unwrap();
    tonic::client::Grpc::with_origin(H2(sender), origin)
}

fn request(text: &str, token: Option<&str>) -> tonic::Request<Msg> {
    let mut req = tonic::Request::new(Msg { text: text.into() });
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    // A client-chosen identity, which must never reach the service.
    req.metadata_mut()
        .insert("x-user-id", "user_attacker".parse().unwrap());
    req
}

#[tokio::test]
async fn tonic_unary_and_server_streaming_through_clerkgate() {
    let users = Users::default();
    let upstream = serve_grpc(users.clone()).await;
    let clerk = FakeClerk::start().await;
    let gate = Sidecar::start_config(
        config(
            &base_toml(&clerk, &upstream),
            "[proxy]\nupstream_protocol = \"h2c\"\n",
        )
        .unwrap(),
    )
    .await;
    assert!(gate.wait_ready(std::time::Duration::from_secs(10)).await);
    let token = clerk.session_token("user_tonic");
    let mut grpc = grpc_client(&gate).await;

    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(
            request("abc", Some(&token)),
            PathAndQuery::from_static("/echo.Echo/Unary"),
            Codec::default(),
        )
        .await
        .unwrap();
    assert_eq!(resp.get_ref().text, "user_tonic:cba");

    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            request("3", Some(&token)),
            PathAndQuery::from_static("/echo.Echo/Count"),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(m.text);
    }
    assert_eq!(got, ["1", "2", "3"]);
    // The stream ended on the service's OK trailers (an error status would have been an Err).
    assert!(stream.trailers().await.unwrap().is_some());
    assert_eq!(*users.lock().unwrap(), ["user_tonic", "user_tonic"]);

    // Without a token: tonic reads clerkgate's refusal as UNAUTHENTICATED with the reason.
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            request("abc", None),
            PathAndQuery::from_static("/echo.Echo/Unary"),
            Codec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "session-token-missing");
    grpc.ready().await.unwrap();
    let status = grpc
        .server_streaming(
            request("3", Some("e30.e30.e30")),
            PathAndQuery::from_static("/echo.Echo/Count"),
            Codec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        users.lock().unwrap().len(),
        2,
        "refused calls never reached the service"
    );
}
