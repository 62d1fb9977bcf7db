//! Metering: what a request asks for ([`inspect`]), the few rewrites the
//! gateway makes to a request body ([`rewrite`]), the usage an upstream
//! reports while its answer passes ([`Meter`]), and what that usage costs
//! ([`Price`]).
//!
//! The meter reads bytes and never changes them, with one documented
//! exception: when the gateway itself injected `stream_options.include_usage`
//! into a streamed request, the usage-only event that the client did not ask
//! for is withheld from it (every other byte is identical).
//!
//! | file | owns |
//! |---|---|
//! | `route` | [`Endpoint`]: which API operation a path names |
//! | `request` | [`inspect`]: model, stream, completion bound, prompt bound |
//! | `rewrite` | [`rewrite`]: the body edits the gateway makes |
//! | `usage` | [`Usage`] and the upstream shapes it is read from |
//! | `scan` | [`Meter`]: SSE and JSON scanning as the answer passes |
//! | `price` | [`Price`]: cost and its upper bound |

// `ApiError` is the crate's one error type and is answered as is; these
// functions run once per request, not per frame, so its size costs nothing.
#![allow(clippy::result_large_err)]

mod price;
mod request;
mod rewrite;
mod route;
mod scan;
mod usage;

pub use price::Price;
pub use request::{
    ESTIMATE_IMAGE_TOKENS, ESTIMATE_PART_TOKENS, ESTIMATE_REQUEST_TOKENS, IMAGE_TOKEN_BOUND,
    PART_OVERHEAD_TOKENS, REQUEST_OVERHEAD_TOKENS, RequestInfo, inspect,
};
pub use rewrite::{Rewrite, rename_roles, rewrite};
pub use route::{Canonical, Endpoint, classify};
pub use scan::{Framing, Meter};
pub use usage::Usage;
