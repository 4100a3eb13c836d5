//! Route building blocks shared by the API, the probes and `/metrics`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::from_fn;
use actix_web::{web, HttpRequest, Resource, Route};

use crate::error::ApiError;
use crate::openapi::{Documented, Endpoint};

/// A documented resource: answers `endpoints` and 405 `method_not_allowed` (with `Allow`)
/// to anything else, and carries its part of the OpenAPI document, built from the same
/// endpoints (see [`crate::openapi`]).
pub fn resource<const N: usize>(
    path: &str,
    endpoints: [Endpoint; N],
) -> Documented<
    Resource<
        impl ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<impl MessageBody>,
            Error = actix_web::Error,
            InitError = (),
        >,
    >,
> {
    // The token check sits on each documented route, outermost: after routing, so an
    // unknown path is 404 and an undeclared method 405 whatever the header says, and
    // around the session middleware, whose commit position it turns into the answer's
    // token.
    let endpoints = endpoints
        .map(|endpoint| endpoint.map_route(|route| route.wrap(from_fn(crate::consistency::token))));
    Documented::build(path, endpoints, |routes| {
        undocumented_resource(path, routes)
    })
}

/// A resource left out of the OpenAPI document (test and benchmark routes): answers
/// `methods` and 405 `method_not_allowed` (with `Allow`) to anything else; Actix's route
/// macros would fall through to 404.
pub fn undocumented_resource<const N: usize>(
    path: &str,
    methods: [(Method, Route); N],
) -> Resource<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let allow: Vec<Method> = methods.iter().map(|(m, _)| m.clone()).collect();
    let mut resource = web::resource(path);
    for (method, route) in methods {
        resource = resource.route(route.method(method));
    }
    resource.default_service(web::to(move || {
        let allow = allow.clone();
        async move { Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed(allow)) }
    }))
}

/// The app's default service: 404 `not_found` for any path no route knows.
pub async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {}", req.path())))
}
