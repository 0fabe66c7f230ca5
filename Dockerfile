# One image for all four services: `rtml serve NAME` picks the service.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 rtml
COPY --from=build /install /usr/local
USER rtml
WORKDIR /home/rtml
ENV RTML_HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 8001 8002 8003 8004
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import os,sys,urllib.request; s=os.environ.get('RTML_SERVICE','ingest'); p=os.environ.get('RTML_'+s.upper()+'_PORT', {'ingest':'8001','features':'8002','serving':'8003','feedback':'8004'}[s]); urllib.request.urlopen('http://127.0.0.1:'+p+'/healthz', timeout=2)" || exit 1
ENTRYPOINT ["rtml"]
CMD ["serve", "ingest"]
