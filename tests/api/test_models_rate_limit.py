"""`/v1/models` and `/v1/models/{id}` take from the key's request bucket, as generations do."""

from __future__ import annotations

import httpx

from tests.server_process import ServerProcess


def test_model_listing_charges_the_keys_request_bucket(server: ServerProcess, client: httpx.Client) -> None:
    """Was: any number of `/v1/models` calls, whatever the key's requests_per_second."""
    body = {"name": "slow", "scopes": ["t:*"], "requests_per_second": 0.1}  # 1 request, then 1 per 10 s
    created = client.post(server.url + "/admin/keys", json=body, headers=server.admin_headers)
    assert created.status_code == 201, created.text
    headers = {"Authorization": f"Bearer {created.json()['key']}"}
    first = client.get(server.url + "/v1/models", headers=headers)
    assert first.status_code == 200 and [m["id"] for m in first.json()["data"]] == ["t:good"]
    for path in ("/v1/models", "/v1/models/t:good"):
        refused = client.get(server.url + path, headers=headers)
        assert refused.status_code == 429, (path, refused.text)
        assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    # the admin token is not a key: no bucket, never limited
    assert client.get(server.url + "/v1/models/t:good", headers=server.admin_headers).status_code == 200
