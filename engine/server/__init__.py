"""afdserve's network front ends: the OpenAI-compatible HTTP server (and the gRPC service beside it).

    HTTP request ─► api_server (routes, auth, disconnect race, SIGTERM drain)
                      │ parses the body into a protocol.* model (errors.* gives 400/401/404 in the OpenAI shape)
                      ▼
                    serving_completions / serving_chat: request ─► prompt token ids + SamplingParams
                      │ serving_common.generate_tracked ─► AsyncEngine.generate (one stream per prompt)
                      │                                  └► metrics (per-request histograms, aborts)
                      ▼
                    one JSON response, or SSE chunks `data: {...}` ending in `data: [DONE]`

Everything here runs on the event loop; the engine itself runs on AsyncEngine's thread.
"""
