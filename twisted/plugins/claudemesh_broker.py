from twisted.application.service import ServiceMaker

claudemesh_broker = ServiceMaker("claudemesh broker", "claudemesh.broker.tap", "The claudemesh message broker.", "claudemesh-broker")
