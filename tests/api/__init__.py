"""Tests of server/api: routes, schemas, errors, HTTP guards."""
