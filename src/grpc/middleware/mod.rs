//! The tower layers around every call, outermost first as `app` stacks them:
//! [`transport_status`] (tonic's own statuses made exact), [`request_id`] (an id and a
//! span per call, and its deadline), [`rpc_metrics`] (calls by method and code),
//! [`auth`] (API keys and scopes), and around the ingest service only [`admission`]
//! (load shedding).
//!
//! The four that act on a call share one skeleton, [`Middleware`]: a [`Hook`] looks at
//! the request and either answers it itself or lets it through, then shapes the
//! response; the skeleton is the `tower::Service` plumbing they would otherwise each
//! repeat.

pub mod admission;
pub mod auth;
pub mod request_id;
pub mod rpc_metrics;
pub mod transport_status;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http_body::{Frame, SizeHint};
use hyper::body::Bytes;
use tonic::{Status, body::Body, server::NamedService};
use tower::{Layer, Service};

/// What one middleware does around a call.
pub trait Hook: Clone + Send + Sync + 'static {
    /// What the hook keeps from the request for the response (a method name, a permit).
    type Carry: Send + 'static;

    /// Looks at the request: `Ok` lets it through, `Err` answers it here with that status
    /// (boxed: it is the rare path, and a `Status` is large).
    fn before<B>(&self, request: &http::Request<B>) -> Result<Self::Carry, Box<Status>>;

    /// Shapes the response of a call that went through.
    fn after(&self, carry: Self::Carry, response: http::Response<Body>) -> http::Response<Body> {
        let _ = carry;
        response
    }

    /// The span the rest of the stack is called in (the handler's own spans are made
    /// then): none by default.
    fn span(&self, carry: &Self::Carry) -> Option<tracing::Span> {
        let _ = carry;
        None
    }

    /// Runs the call (`call`: its handler, the rest of the stack, then [`Hook::after`])
    /// inside whatever context the hook gives it: a span, a deadline. As it is, by default.
    fn around<T: 'static, C>(&self, carry: Self::Carry, call: C) -> BoxFuture<'static, T>
    where
        C: FnOnce(Self::Carry) -> BoxFuture<'static, T>,
    {
        call(carry)
    }
}

/// A layer of [`Middleware`] with `hook`.
#[derive(Debug, Clone)]
pub struct HookLayer<H>(pub H);

impl<H: Clone, S> Layer<S> for HookLayer<H> {
    type Service = Middleware<H, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Middleware {
            hook: self.0.clone(),
            inner,
        }
    }
}

/// The service every hook runs in.
#[derive(Debug, Clone)]
pub struct Middleware<H, S> {
    hook: H,
    inner: S,
}

impl<H, S: NamedService> NamedService for Middleware<H, S> {
    const NAME: &'static str = S::NAME;
}

impl<H, S, B> Service<http::Request<B>> for Middleware<H, S>
where
    H: Hook,
    S: Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let carry = match self.hook.before(&request) {
            Ok(carry) => carry,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let call = {
            let _entered = self.hook.span(&carry).map(tracing::Span::entered);
            self.inner.call(request)
        };
        let hook = self.hook.clone();
        self.hook.around(carry, move |carry| {
            Box::pin(async move {
                let response = call.await?;
                Ok(hook.after(carry, response))
            })
        })
    }
}

/// Something a body carries until it is done or dropped (a permit), and that may look at
/// each frame going through (the trailers, with the call's status; the messages).
pub trait Watcher: Send + Unpin + 'static {
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
}

/// `response` with `watcher` attached to its body.
fn watched<W: Watcher>(response: http::Response<Body>, watcher: W) -> http::Response<Body> {
    response.map(|body| watch(body, watcher))
}

/// `body` with `watcher` attached (a request's or a response's).
fn watch<W: Watcher>(body: Body, watcher: W) -> Body {
    Body::new(Watched { body, watcher })
}

struct Watched<W> {
    body: Body,
    watcher: W,
}

impl<W: Watcher> http_body::Body for Watched<W> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.watcher.frame(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
