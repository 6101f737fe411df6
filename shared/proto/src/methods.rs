//! The RPC methods an encoded `FileDescriptorSet` declares: their paths and whether they stream, read once at
//! startup by the servers' metrics (which name only methods they serve) and by the gateway (which holds unary
//! calls to one request message).

use prost::Message;
use prost_types::FileDescriptorSet;

/// One RPC method, as its descriptor declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodInfo {
    /// The path the method is called at, e.g. `/cube.auth.v1.AuthService/Login`.
    pub path: String,
    /// The full name of its service, e.g. `cube.auth.v1.AuthService`.
    pub service: String,
    /// The full name of its request message, e.g. `cube.auth.v1.LoginRequest`.
    pub input_type: String,
    /// Whether the client sends a stream of messages (false: exactly one).
    pub client_streaming: bool,
    /// Whether the server answers with a stream of messages.
    pub server_streaming: bool,
}

/// Returns every method of every service in the encoded `FileDescriptorSet` `set`.
///
/// # Errors
/// Returns an error when `set` is not an encoded `FileDescriptorSet`.
pub fn methods(set: &[u8]) -> Result<Vec<MethodInfo>, prost::DecodeError> {
    let set = FileDescriptorSet::decode(set)?;
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            let service_name = if package.is_empty() {
                service.name().to_owned()
            } else {
                format!("{package}.{}", service.name())
            };
            for method in &service.method {
                out.push(MethodInfo {
                    path: format!("/{service_name}/{}", method.name()),
                    service: service_name.clone(),
                    input_type: method.input_type().trim_start_matches('.').to_owned(),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cube_set_lists_its_methods_with_their_shapes() {
        let listed = methods(crate::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
        let login = listed
            .iter()
            .find(|method| method.path == "/cube.auth.v1.AuthService/Login")
            .expect("Login is listed");
        assert_eq!(login.service, "cube.auth.v1.AuthService");
        assert_eq!(login.input_type, "cube.auth.v1.LoginRequest");
        assert!(!login.client_streaming && !login.server_streaming);
        for package in ["cube.auth.v1.", "cube.projects.v1.", "cube.scheduler.v1."] {
            assert!(
                listed.iter().any(|method| method.service.starts_with(package)),
                "no method in {package}"
            );
        }
        assert!(methods("not a descriptor set".as_bytes()).is_err());
    }
}
