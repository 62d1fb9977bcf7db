//! Which API operation a request path names.

/// Which OpenAI API a path speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    /// The API of a request path (`/v1/chat/completions` → `Chat`). A query
    /// string and one trailing `/` are ignored.
    pub fn from_path(path: &str) -> Endpoint {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            _ => Endpoint::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Other => "other",
        }
    }

    /// Whether a streamed answer reports usage only when asked with
    /// `stream_options.include_usage`.
    pub(super) fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions?x=1"),
            Endpoint::Chat
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Endpoint::Completions
        );
        assert_eq!(Endpoint::from_path("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(Endpoint::from_path("/v1/responses"), Endpoint::Responses);
        assert_eq!(Endpoint::from_path("/v1/responses/resp_1"), Endpoint::Other);
        assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Other);
        assert_eq!(Endpoint::Chat.as_str(), "chat");
        assert_eq!(Endpoint::Other.as_str(), "other");
    }
}
