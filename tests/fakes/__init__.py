"""In-memory fakes of the services' store protocols and peers, for fast domain unit tests.

Each store fake passes the same contract suite as the real store
(tests/unit/test_store_contract_*.py), so a domain test on a fake says something true
about the service.
"""
