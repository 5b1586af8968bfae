"""The embedded MQTT broker: amqtt with its known bugs fixed, configured by mosquitto's syntax.

One `broker.conf`, password file and acl_file serve both this broker and mosquitto. Start it
as a process with `start_broker_process` (what the master does), or inside an event loop with
`run_broker` / `EmbeddedBroker`.
"""

from broker.acl import Access, AclFile, AclRule
from broker.conf import BrokerConfig, Listener, TlsSettings, load_config, parse_config
from broker.embedded import EmbeddedBroker, check_anonymous_policy, run_broker, tls_context
from broker.errors import BrokerConfigError, BrokerError, BrokerStartError, PasswordFileError
from broker.passwd import (PasswordFile, add_user, check_password, hash_password,
                           remove_user, verify)
from broker.plugins import AclFilePlugin, PasswordFileAuthPlugin
from broker.process import BrokerProcess, start_broker_process
from broker.trusted import TrustedCredential, issue_credential

__all__ = [
    "Access", "AclFile", "AclRule",
    "BrokerConfig", "Listener", "TlsSettings", "load_config", "parse_config",
    "EmbeddedBroker", "check_anonymous_policy", "run_broker", "tls_context",
    "BrokerConfigError", "BrokerError", "BrokerStartError", "PasswordFileError",
    "PasswordFile", "add_user", "check_password", "hash_password", "remove_user", "verify",
    "AclFilePlugin", "PasswordFileAuthPlugin",
    "BrokerProcess", "start_broker_process",
    "TrustedCredential", "issue_credential",
]
